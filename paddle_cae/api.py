"""A small API for notebooks and scripts; the command-line entry points use the same functions.

    from paddle_cae import create_model, load_checkpoint, predict

    model = load_checkpoint("output/demo_finetune_mae/checkpoint-best.pd")   # network + weights
    predict(model, "demo/digits/val/3")            # -> per image [(class name, probability), ...]

:func:`load_checkpoint` rebuilds the network stored in one of this package's checkpoints
(fine-tuned, linear-probe, or pretraining for reconstructions); for an official PyTorch file or
a plain state dict, name the classifier: ``load_checkpoint("mae_finetuned_vit_base.pth",
model_name="vit_base_patch16")``. It returns the model with the fast CPU layers swapped in
(:func:`paddle_cae.fast.accelerate`); a model from :func:`create_model` is the reference
network: ``accelerate(model)`` before training it on a CPU.
"""
import os

import numpy as np
import paddle

from .convert import CheckpointError
from .data.imagenet_classes import NUM_CLASSES as IMAGENET_CLASSES
from .data.imagenet_classes import imagenet_class_names
from .engine.evaluate import predictions
from .fast import accelerate
from .inference.predict import image_paths, preprocessing, to_batch, topk_predictions
from .loading.classifier import build_classifier
from .loading.pretrained import load_pretrained, read_weights_file, strict_load
from .methods import method_for
from .models.registry import create_model, model_task

__all__ = ["CheckpointError", "accelerate", "create_model", "load_checkpoint", "predict",
           "predict_batch"]


def _pretraining_model(weights, model_name):
    """Rebuild the pretraining model a ``kind: pretrain`` checkpoint of this package holds."""
    args = (weights.raw or {}).get("args") or {}
    name = weights.model_name or args.get("model")
    if model_name and model_name != name:
        raise ValueError(f"{weights.path} is a pretraining checkpoint of {name}, not of {model_name}")
    method = method_for(name)
    kwargs = method.inference_kwargs(args)
    with paddle.utils.unique_name.guard():
        model = create_model(name, **kwargs)
    strict_load(model, weights.state, weights.path)
    mean, std = method.pretrain_mean_std(args)
    model.preprocess_config = {"input_size": int(args.get("input_size", 224)), "mean": list(mean),
                               "std": list(std), "crop_pct": 1.0, "model": name}
    return model


def _head_classes(state, layout="paddle"):
    """Number of classes of a classifier head: the length of its bias, else the output side of
    its weight (Paddle Linear weights are [in, out], PyTorch ones [out, in])."""
    for prefix in ("head.", "head.1.", "head.linear.", "module.head.", "module.head.1."):
        bias, weight = state.get(prefix + "bias"), state.get(prefix + "weight")
        if bias is not None and len(np.shape(bias)) == 1:
            return int(np.shape(bias)[0])
        if weight is not None and len(np.shape(weight)) == 2:
            shape = np.shape(weight)
            return int(shape[0] if layout == "torch" else shape[1])
    return None


def load_checkpoint(path, model_name=None, model=None, model_args=None):
    """A ready-to-use model (eval mode) from a checkpoint file.

    * this package's fine-tune / probe checkpoints: the stored network, weights loaded strictly,
      ``model.class_names`` from the training folders;
    * this package's pretraining checkpoints: the pretraining model (for reconstructions);
    * encoder exports: refused (no classifier and no decoder);
    * any other file (official ``.pth``, converted ``.pd``): ``model_name`` (a classifier) is
      required; the number of classes comes from the head; ImageNet names for 1000 classes.

    ``model`` (optional) is a network to load into instead of building one; ``model_args``
    (optional dict) are constructor arguments for ``model_name`` (e.g. a small variant).
    ``model_name`` given for one of our checkpoints must match the one it was trained as.
    Raises ``CheckpointError`` / ``ValueError`` with one line naming the file."""
    weights = read_weights_file(path)
    raw = weights.raw if isinstance(weights.raw, dict) else {}
    kind = raw.get("kind")
    if kind in ("finetune", "linprobe") and isinstance(raw.get("classifier"), dict):
        config = raw["classifier"]
        if model_name and model_name != config["model"] and model_task(model_name) == "classify":
            raise ValueError(f"{weights.path} holds a {config['model']} classifier, not {model_name}")
        model = model or build_classifier(config, for_training=False)
        strict_load(model, weights.state, weights.path)
        model.class_names = list(raw.get("class_names") or [])
        model.preprocess_config = config
    elif kind == "pretrain":
        model = model or _pretraining_model(weights, model_name)
    elif kind == "encoder":
        raise ValueError(f"{weights.path} is an encoder export: it has neither a classifier head nor "
                         "a decoder. Fine-tune it (main_finetune.py --finetune) or use the full "
                         "pretraining checkpoint")
    else:
        if model is None:
            if not model_name:
                raise ValueError(f"{weights.path} does not say which network it holds: pass the "
                                 "classifier name (--model)")
            if model_task(model_name) != "classify":
                raise ValueError(f"--model {model_name} is not a classifier; name one of the "
                                 "fine-tuning models (e.g. vit_base_patch16)")
            classes = _head_classes(weights.state, weights.layout)
            if classes is None:
                raise ValueError(f"{weights.path} has no classifier head (head.weight): it holds "
                                 "pretrained weights; fine-tune them first")
            with paddle.utils.unique_name.guard():
                model = create_model(model_name, num_classes=classes, **dict(model_args or {}))
        report = load_pretrained(getattr(model, "backbone", model), weights.path)
        if "head.weight" in report.initialised:
            found = _head_classes(weights.state, weights.layout)
            raise ValueError(f"{weights.path}: its classifier head ({found} classes) does not fit "
                             f"{model_name or type(model).__name__}")
        classes = _head_classes({k: v for k, v in model.state_dict().items()})
        model.class_names = imagenet_class_names() if classes == IMAGENET_CLASSES else []
        size = model.patch_embed.img_size[0] if hasattr(model, "patch_embed") else 224
        model.preprocess_config = {"input_size": size}
    model.checkpoint_kind = kind or "external"
    accelerate(model)
    model.eval()
    return model


def _as_list(images):
    if isinstance(images, (str, os.PathLike)):
        return image_paths(images)
    if isinstance(images, (list, tuple)):
        out = []
        for item in images:
            out.extend(image_paths(item) if isinstance(item, (str, os.PathLike)) else [item])
        return out
    return [images]  # a PIL image


def predict_batch(model, images, batch_size=32):
    """Softmax probabilities [N, C] (numpy) for image paths, a folder, PIL images, or an already
    preprocessed array/tensor [N, 3, H, W]."""
    if isinstance(images, (np.ndarray, paddle.Tensor)):
        return predictions(model, paddle.to_tensor(images, dtype="float32"))
    items = _as_list(images)
    transform = preprocessing(getattr(model, "preprocess_config", {}) or {})
    probs = [predictions(model, to_batch(items[i:i + batch_size], transform))
             for i in range(0, len(items), batch_size)]
    return np.concatenate(probs, axis=0)


def predict(model, images, topk=5, class_names=None, batch_size=32):
    """Top-k ``(class name, probability)`` per image, highest first. ``images`` as in
    :func:`predict_batch`; class names default to ``model.class_names``."""
    names = class_names if class_names is not None else getattr(model, "class_names", None)
    return topk_predictions(predict_batch(model, images, batch_size), names, topk)

