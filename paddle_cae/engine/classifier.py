"""Building the classifier a fine-tune / probe run trains, from a small config dict that is saved
in every checkpoint, so inference rebuilds exactly the same network.

Config keys: ``model`` (classifier name), ``num_classes``, ``input_size``, ``model_args``
(extra constructor arguments), ``global_pool``, ``rel_pos_bias``, ``sin_pos_emb``,
``layer_scale_init_value``, ``init_scale``, ``drop_path``, ``probe`` (None, 'standard' or
'attentive') and ``depth`` (blocks kept for probing), and the evaluation preprocessing ``mean``, ``std``, ``crop_pct``.
"""
import paddle

from ..data.transforms import mean_std
from ..models import create_model
from ..models.probe import AttentiveProbe
from ..runtime.finetune_args import classifier_family, classifier_name


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
    }


def constructor_kwargs(config, for_training=True):
    family = classifier_family(config["model"])
    kwargs = dict(config.get("model_args") or {})
    kwargs["img_size"] = config["input_size"]
    kwargs["drop_path_rate"] = config.get("drop_path", 0.0) if for_training else 0.0
    if family == "cae":
        kwargs["use_rel_pos_bias"] = config.get("rel_pos_bias", True)
        kwargs["pos_embed_type"] = "sincos" if config.get("sin_pos_emb", True) else "none"
        if config.get("layer_scale_init_value") is not None:
            kwargs["init_values"] = config["layer_scale_init_value"] or None
    if family in ("cae", "bootmae"):
        kwargs["init_scale"] = config.get("init_scale", 0.001)
    if config.get("depth"):
        kwargs["depth"] = int(config["depth"])
    return kwargs


def build_classifier(config, for_training=True):
    """A fresh classifier for ``config`` (drop path only when ``for_training``). Built under its
    own name scope so optimizer state keys do not depend on what was built before."""
    kwargs = constructor_kwargs(config, for_training)
    with paddle.utils.unique_name.guard():
        if config.get("probe") == "attentive":
            backbone = create_model(config["model"], num_classes=0, global_pool=False, **kwargs)
            return AttentiveProbe(backbone, config["num_classes"])
        return create_model(config["model"], num_classes=config["num_classes"],
                            global_pool=config["global_pool"],
                            lin_probe=config.get("probe") == "standard", **kwargs)


def encoder_of(model):
    """The ViT whose weights ``--finetune`` fills (the backbone of an attentive probe)."""
    return getattr(model, "backbone", model)


__all__ = ["build_classifier", "classifier_config", "constructor_kwargs", "encoder_of"]
