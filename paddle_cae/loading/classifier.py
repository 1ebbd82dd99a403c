"""Building the classifier a fine-tune / probe run trains, from a small config dict that is saved
in every checkpoint, so inference rebuilds exactly the same network.

Config keys: ``model`` (classifier name), ``num_classes``, ``input_size``, ``model_args``
(extra constructor arguments), ``global_pool``, ``rel_pos_bias``, ``sin_pos_emb``,
``layer_scale_init_value``, ``init_scale``, ``drop_path``, ``probe`` (None, 'standard' or
'attentive') and ``depth`` (blocks kept for probing), ``head_init_std`` (MAE: 2e-5 with
``--finetune``, 0.02 from scratch), and the evaluation preprocessing ``mean``, ``std``, ``crop_pct``,
``transform_method`` (see :func:`transform_method`).

``model_args`` and the named flags: a ``model_args`` key that a named flag also sets
(``num_classes``, ``global_pool``, ``img_size``, ``drop_path_rate``, CAE's ``use_rel_pos_bias``,
``pos_embed_type`` and ``init_values``, ``init_scale``, ``lin_probe``) must agree with the flag's
value; a disagreement is an error naming the key and the flag. ``depth`` is the exception: a
probe's ``--depth`` keeps the first blocks of the encoder ``model_args`` describes (never more).
"""
import paddle

from ..data.transforms import mean_std
from ..models import create_model
from ..models.probe import AttentiveProbe
from ..methods import classifier_method, classifier_name


def transform_method(args):
    """The method (:class:`paddle_cae.methods.Method`) whose official ``build_transform`` a
    run's images follow: the fine-tune family (and CAE's attentive probe, trained on that code
    path); None for the linear probe (MAE's rules)."""
    if getattr(args, "phase", "finetune") == "linprobe" and getattr(args, "linear_type", None) != "attentive":
        return None
    return classifier_method(args.model)


def classifier_config(args, num_classes):
    """The config of the classifier ``args`` (fine-tune or linear-probe flags) asks for."""
    probe = getattr(args, "linear_type", None) if getattr(args, "phase", "") == "linprobe" else None
    return {
        "model": classifier_name(args.model),
        "num_classes": int(num_classes),
        "input_size": int(args.input_size),
        "model_args": dict(getattr(args, "model_args", None) or {}),
        "global_pool": bool(args.global_pool),
        "rel_pos_bias": bool(getattr(args, "rel_pos_bias", False)),
        "sin_pos_emb": bool(getattr(args, "sin_pos_emb", True)),
        "layer_scale_init_value": getattr(args, "layer_scale_init_value", None),
        "init_scale": float(getattr(args, "init_scale", 0.001) or 0.001),
        "drop_path": float(getattr(args, "drop_path", 0.0) or 0.0),
        "probe": probe,
        "depth": getattr(args, "depth", None),
        # the evaluation preprocessing, so that inference needs nothing but the checkpoint
        "mean": list(mean_std(args.imagenet_default_mean_and_std)[0]),
        "std": list(mean_std(args.imagenet_default_mean_and_std)[1]),
        "crop_pct": getattr(args, "crop_pct", None),
        # whose build_transform rules the evaluation preprocessing follows (data.transforms: the
        # small-image branch and the default crop_pct of CAE/BootMAE); None: MAE's rules
        "transform_method": getattr(transform_method(args), "name", None),
        # the head's init std where the method's recipe sets it (MAE: 2e-5 after loading
        # --finetune weights, 0.02 from scratch; CAE/BootMAE scale theirs by --init_scale)
        "head_init_std": classifier_method(args.model).head_init_std(args, probe),
    }


class ModelArgsConflict(ValueError):
    """A ``--model_args`` key disagrees with the named flag that sets the same constructor argument."""


def _same(a, b):
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        def pair(v):
            return tuple(v) if isinstance(v, (list, tuple)) else (v, v)
        return pair(a) == pair(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b)
    return a == b


def _merge_flag(kwargs, key, value, flag):
    """Set constructor argument ``key`` from a named flag. Rule: a ``--model_args`` key that a named
    flag also sets must agree with it (the flag's value after its method default); otherwise it is
    an error naming both. The flag's value is then used."""
    if key in kwargs and not _same(kwargs[key], value):
        raise ModelArgsConflict(
            f"--model_args sets '{key}': {kwargs[key]!r} but {flag} gives {value!r}; the named flag sets "
            f"this argument: remove '{key}' from --model_args or change {flag} so they agree")
    kwargs[key] = value


def constructor_kwargs(config, for_training=True):
    """Constructor arguments of the classifier: ``model_args`` merged with the named flags (see
    :func:`_merge_flag` for the rule) plus ``num_classes``, ``global_pool`` and ``lin_probe``."""
    method = classifier_method(config["model"])
    kwargs = dict(config.get("model_args") or {})
    _merge_flag(kwargs, "num_classes", int(config["num_classes"]),
                "--nb_classes (default: the number of class folders)")
    _merge_flag(kwargs, "global_pool", bool(config["global_pool"]),
                "--global_pool / --cls_token (its method default when not given)")
    _merge_flag(kwargs, "img_size", config["input_size"], "--input_size")
    if for_training:
        _merge_flag(kwargs, "drop_path_rate", config.get("drop_path", 0.0), "--drop_path")
    else:
        kwargs["drop_path_rate"] = 0.0  # evaluation and inference: no stochastic depth
    method.classifier_kwargs(config, kwargs, _merge_flag)
    if config.get("depth"):  # probing keeps the first --depth blocks of the encoder model_args describe
        keep = int(config["depth"])
        if "depth" in kwargs and keep > int(kwargs["depth"]):
            raise ModelArgsConflict(f"--depth {keep} keeps more blocks than the encoder has "
                                    f"(--model_args 'depth': {kwargs['depth']})")
        kwargs["depth"] = keep
    _merge_flag(kwargs, "lin_probe", config.get("probe") == "standard", "--linear_type standard")
    return kwargs


def build_classifier(config, for_training=True):
    """A fresh classifier for ``config`` (drop path only when ``for_training``). Built under its
    own name scope so optimizer state keys do not depend on what was built before."""
    kwargs = constructor_kwargs(config, for_training)
    with paddle.utils.unique_name.guard():
        if config.get("probe") == "attentive":
            kwargs.update(num_classes=0, global_pool=False, lin_probe=False)  # the backbone of the probe
            backbone = create_model(config["model"], **kwargs)
            return AttentiveProbe(backbone, config["num_classes"])
        return create_model(config["model"], **kwargs)


def encoder_of(model):
    """The ViT whose weights ``--finetune`` fills (the backbone of an attentive probe)."""
    return getattr(model, "backbone", model)


__all__ = ["ModelArgsConflict", "build_classifier", "classifier_config", "constructor_kwargs",
           "encoder_of", "transform_method"]
