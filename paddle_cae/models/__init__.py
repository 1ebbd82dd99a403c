from .registry import create_model, list_models, model_task, register_model  # noqa: F401
