"""Public model names -> constructors.

The names are the ones the official repositories register (``vit_base_patch16``,
``cae_base_patch16_224_8k_vocab``, ``bootmae_base`` ...), so command lines carry over.
Each model file registers its constructors with ``@register_model``; this module imports
every module of the ``paddle_cae.models`` package on first use, so adding a model never means
editing a central list.
"""
import importlib
import inspect
import numbers
import pkgutil
import sys

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


class ModelArgumentError(ValueError):
    """A constructor argument (``--model_args`` or a config's ``model_args``) of the wrong type
    or unknown to the model; the message is one line naming the key."""


def _constructor_defaults(fn):
    """name -> default of every keyword the constructor ``fn`` and the model classes of its
    module accept (the constructors pass ``**kwargs`` on to those classes)."""
    module = sys.modules.get(fn.__module__)
    callables = [fn] + [obj.__init__ for obj in vars(module).values()
                        if inspect.isclass(obj) and obj.__module__ == fn.__module__]
    defaults = {}
    for target in callables:
        try:
            parameters = inspect.signature(target).parameters.values()
        except (TypeError, ValueError):
            continue
        for p in parameters:
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name == "self":
                continue
            defaults.setdefault(p.name, p.default)
    return defaults


def _expected_kind(default, value):
    """What ``value`` should have been, judged by the constructor's ``default`` (None when it
    fits or nothing can be said)."""
    def number(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool)

    if default is inspect.Parameter.empty or default is None or value is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if number(default):  # sizes may also be given per axis ([h, w])
        return None if number(value) or isinstance(value, (list, tuple)) else "a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    if isinstance(default, (list, tuple)):
        return None if number(value) or isinstance(value, (list, tuple)) else "a list"
    return None


def check_model_arguments(name, kwargs):
    """Raise :class:`ModelArgumentError` naming the first argument whose type cannot be what
    the constructor of ``name`` expects (e.g. ``{"embed_dim": "big"}``)."""
    defaults = _constructor_defaults(_REGISTRY[name])
    for key, value in kwargs.items():
        expected = _expected_kind(defaults.get(key, inspect.Parameter.empty), value)
        if expected:
            raise ModelArgumentError(
                f"model {name}: argument '{key}' is {value!r}, expected {expected}; check "
                "--model_args / model_args")


def create_model(name, **kwargs):
    """Build a registered model; keyword arguments override the constructor defaults. An
    argument of the wrong type, or one the model does not take, is a one-line
    :class:`ModelArgumentError` naming it."""
    _load_all()
    if name not in _REGISTRY:
        known = ", ".join(list_models())
        raise KeyError(f"unknown model '{name}'. Known models: {known}")
    check_model_arguments(name, kwargs)
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as err:
        text = str(err)
        if "unexpected keyword argument" not in text:
            raise
        key = text.rsplit("argument", 1)[-1].strip(" '\"")
        raise ModelArgumentError(
            f"model {name} has no argument '{key}'; check --model_args / model_args") from None
