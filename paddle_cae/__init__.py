"""paddle-cae: CAE, MAE and BootMAE masked-image-modeling for Vision Transformers in PaddlePaddle.

The notebook API is imported on first use, so ``python -m paddle_cae.<tool>`` starts without
loading the rest of the package first.
"""
__version__ = "0.1.0"

_API = {
    "create_model": "paddle_cae.models.registry",
    "list_models": "paddle_cae.models.registry",
    "load_checkpoint": "paddle_cae.api",
    "predict": "paddle_cae.api",
}

__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'paddle_cae' has no attribute {name!r}")
