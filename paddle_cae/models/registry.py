"""Public model names -> constructors.

The names are the ones the official repositories register (``vit_base_patch16``,
``cae_base_patch16_224_8k_vocab``, ``bootmae_base`` ...), so command lines carry over.
Each model file registers its constructors with ``@register_model``; this module imports
every module of the ``paddle_cae.models`` package on first use, so adding a model never means
editing a central list.
"""
import importlib
import pkgutil

_REGISTRY = {}
_TASKS = {}
_METHODS = {}
_CLASSIFIERS = {}
_imported_packages = set()


def register_model(task, method=None, classifier=None):
    """Register a constructor under its function name. ``task`` is one of
    'pretrain', 'classify', 'tokenizer' and lets the CLIs list what they can build; ``method``
    names the :mod:`paddle_cae.methods` method the model belongs to (its recipe, pipeline and
    rules); ``classifier`` (pretraining models) the classifier its encoder is fine-tuned as."""

    def wrap(fn):
        if fn.__name__ in _REGISTRY:
            raise ValueError(f"model name registered twice: {fn.__name__}")
        _REGISTRY[fn.__name__] = fn
        _TASKS[fn.__name__] = task
        if method is not None:
            _METHODS[fn.__name__] = method
        if classifier is not None:
            _CLASSIFIERS[fn.__name__] = classifier
        return fn

    return wrap


def import_modules_of(package, skip=()):
    """Import every module of ``package`` except those named in ``skip``, once per package:
    registrations run on import, so a new file in the folder needs no list to be found."""
    if package in _imported_packages:
        return
    _imported_packages.add(package)  # first: a module may look models up while it is imported
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if info.name not in skip:
            importlib.import_module(f"{package}.{info.name}")


def _load_all():
    import_modules_of(__name__.rsplit(".", 1)[0], skip=("registry",))


def list_models(task=None):
    _load_all()
    return sorted(n for n in _REGISTRY if task is None or _TASKS[n] == task)


def model_task(name):
    _load_all()
    return _TASKS[name]


def model_method(name):
    """The method a model was registered with (None when its registration names none)."""
    _load_all()
    return _METHODS.get(name)


def model_classifier(name):
    """The classifier a registered pretraining model is fine-tuned as (None if it names none)."""
    _load_all()
    return _CLASSIFIERS.get(name)


def create_model(name, **kwargs):
    """Build a registered model; keyword arguments override the constructor defaults."""
    _load_all()
    if name not in _REGISTRY:
        known = ", ".join(list_models())
        raise KeyError(f"unknown model '{name}'. Known models: {known}")
    return _REGISTRY[name](**kwargs)
