"""Public model names -> constructors.

The names are the ones the official repositories register (``vit_base_patch16``,
``cae_base_patch16_224_8k_vocab``, ``bootmae_base`` ...), so command lines carry over.
Each model file registers its constructors with ``@register_model``; this module imports
those files on first use, so adding a method never means editing a central list.
"""
import importlib

_MODEL_FILES = ("vit", "mae", "cae", "bootmae", "dalle")
_REGISTRY = {}
_TASKS = {}
_loaded = False


def register_model(task):
    """Register a constructor under its function name. ``task`` is one of
    'pretrain', 'classify', 'tokenizer' and lets the CLIs list what they can build."""

    def wrap(fn):
        if fn.__name__ in _REGISTRY:
            raise ValueError(f"model name registered twice: {fn.__name__}")
        _REGISTRY[fn.__name__] = fn
        _TASKS[fn.__name__] = task
        return fn

    return wrap


def _load_all():
    global _loaded
    if _loaded:
        return
    for name in _MODEL_FILES:
        try:
            importlib.import_module(f"paddle_cae.models.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"paddle_cae.models.{name}":
                raise
    _loaded = True


def list_models(task=None):
    _load_all()
    return sorted(n for n in _REGISTRY if task is None or _TASKS[n] == task)


def model_task(name):
    _load_all()
    return _TASKS[name]


def create_model(name, **kwargs):
    """Build a registered model; keyword arguments override the constructor defaults."""
    _load_all()
    if name not in _REGISTRY:
        known = ", ".join(list_models())
        raise KeyError(f"unknown model '{name}'. Known models: {known}")
    return _REGISTRY[name](**kwargs)
