"""Inference helpers behind ``main_infer.py`` and :mod:`paddle_cae.api`: reading images, top-k
predictions, exporting a Paddle inference model and MAE/BootMAE reconstruction pictures."""
import os

import numpy as np
import paddle
from PIL import Image, ImageDraw, UnidentifiedImageError

from ..data.datasets import IMG_EXTENSIONS
from ..data.transforms import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, build_eval_transform,
                               default_crop_pct, small_image_path)
from ..methods import get_method

MODEL_FILE_PREFIX = "inference"


class ImageInputError(ValueError):
    """An input path is missing, empty or not an image."""


# ---------------------------------------------------------------------------------- images
def image_paths(path):
    """``path`` itself (a file) or the images of a folder (recursively, sorted)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files
                       if f.lower().endswith(IMG_EXTENSIONS))
        if not found:
            raise ImageInputError(f"{path}: folder holds no images ({', '.join(IMG_EXTENSIONS)})")
        return found
    if not os.path.isfile(path):
        raise ImageInputError(f"{path}: no such image file or folder")
    return [path]


def readable_images(paths):
    """(paths that open as images, [(path, reason)] for those that do not)."""
    good, bad = [], []
    for path in paths:
        try:
            read_image(path)
        except ImageInputError as err:
            bad.append((path, str(err)))
            continue
        good.append(path)
    return good, bad


def read_image(path):
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise ImageInputError(f"{path}: not an image (PIL cannot identify its format)") from None
    except (OSError, SyntaxError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageInputError(f"{path}: not a readable image ({detail})") from None


def preprocessing_spec(config):
    """The evaluation preprocessing of a classifier config (or a pretraining model's args) as
    plain values, what an exported model's ``preprocess.json`` holds: resize the shorter side
    to ``resize_short`` (bicubic, the longer side scaled and truncated to an int), centre-crop
    ``crop_size`` (black padding if the image is smaller), RGB in [0, 1], ``(x - mean) / std``,
    layout [N, 3, H, W] float32."""
    size = int(config.get("input_size", 224))
    crop_pct = config.get("crop_pct")
    method = config.get("transform_method")
    method = get_method(method) if method else None
    if crop_pct is None:
        # the small-image path evaluates without resize or crop: for images of the model's
        # size a resize to that size and a full-size crop change nothing
        crop_pct = 1.0 if small_image_path(method, size) else default_crop_pct(size, method)
    return {"resize_short": int(size / crop_pct), "crop_size": size, "interpolation": "bicubic",
            "mean": [float(m) for m in (config.get("mean") or IMAGENET_DEFAULT_MEAN)],
            "std": [float(v) for v in (config.get("std") or IMAGENET_DEFAULT_STD)],
            "crop_pct": float(crop_pct), "layout": "NCHW", "channels": "RGB", "scale": 1 / 255.0}


def preprocessing(config):
    """The evaluation transform a classifier config (or a pretraining model's args) asks for."""
    spec = preprocessing_spec(config)
    return build_eval_transform(spec["crop_size"], tuple(spec["mean"]), tuple(spec["std"]),
                                crop_pct=spec["crop_pct"])


def to_batch(images, transform):
    """PIL images / paths -> float32 tensor [B, 3, H, W]."""
    arrays = [transform(read_image(im) if isinstance(im, (str, os.PathLike)) else im.convert("RGB"))
              for im in images]
    return paddle.to_tensor(np.stack(arrays).astype("float32"))


# ----------------------------------------------------------------------------- predictions
def topk_predictions(probs, class_names, k=5):
    """probs [B, C] -> per image a list of (name, probability), highest first."""
    probs = np.asarray(probs)
    k = min(k, probs.shape[-1])
    out = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        out.append([(class_names[i] if class_names and i < len(class_names) else str(i), float(row[i]))
                    for i in order])
    return out


def topk_records(probs, class_names, k=5):
    """probs [B, C] -> per image the top-k as ``{"class_id", "class_name", "prob"}`` dicts,
    highest first (the records ``main_infer.py --json`` prints)."""
    probs = np.asarray(probs)
    k = min(k, probs.shape[-1])
    out = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        out.append([{"class_id": int(i),
                     "class_name": class_names[i] if class_names and i < len(class_names) else str(i),
                     "prob": float(row[i])} for i in order])
    return out


def format_prediction(records):
    """The lines ``main_infer.py`` prints for one image's top-k records, e.g.
    ``  1. Persian cat (class 283)  88.68%``."""
    return [f"{rank:>3}. {r['class_name']} (class {r['class_id']})  {100.0 * r['prob']:6.2f}%"
            for rank, r in enumerate(records, 1)]


def predictions_json(paths, records):
    """The ``--json`` output: a list with ``{"image": path, "predictions": [records]}`` per image."""
    return [{"image": os.fspath(path), "predictions": recs} for path, recs in zip(paths, records)]


def resolve_device(device):
    """``--device`` as Paddle spells it: None -> ``gpu`` when Paddle is built with CUDA, else
    ``cpu``; ``cuda``/``cuda:N`` are accepted as ``gpu``/``gpu:N``. A GPU asked of a Paddle
    without CUDA is a ValueError naming the device as given."""
    if device is None:
        return "gpu" if paddle.is_compiled_with_cuda() else "cpu"
    asked = str(device).strip()
    name = asked.lower()
    if name == "cuda" or name.startswith("cuda:"):
        name = "gpu" + name[4:]
    if name.startswith("gpu") and not paddle.is_compiled_with_cuda():
        raise ValueError(f"--device {asked}: this Paddle build has no CUDA support "
                         f"(paddle {paddle.__version__}, CPU-only); use --device cpu, or install a "
                         "CUDA build of PaddlePaddle (requirements-gpu.txt)")
    if not (name == "cpu" or name == "gpu" or (name.startswith("gpu:") and name[4:].isdigit())):
        raise ValueError(f"--device {asked}: expected cpu, gpu, gpu:N, cuda or cuda:N")
    return name


# ---------------------------------------------------------------------------------- export
def export_inference_model(model, out_dir, input_size, extra_files=None):
    """``paddle.jit.save`` the model (eval mode) with input [None, 3, H, W]; returns the path
    prefix (``<out_dir>/inference``; Paddle 3 writes ``.json`` + ``.pdiparams``)."""
    os.makedirs(out_dir, exist_ok=True)
    model.eval()
    spec = [paddle.static.InputSpec([None, 3, input_size, input_size], "float32", name="images")]
    static = paddle.jit.to_static(model, input_spec=spec, full_graph=True)
    prefix = os.path.join(out_dir, MODEL_FILE_PREFIX)
    paddle.jit.save(static, prefix)
    for name, text in (extra_files or {}).items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
    return prefix


def run_inference_model(prefix, batch):
    """Run an exported model through ``paddle.inference`` (the deployment runtime) on a numpy
    batch [B, 3, H, W], on the CPU with the plain kernels (the numerics of the dynamic graph);
    returns the logits as numpy."""
    from .predictor import create_predictor, run_predictor

    predictor = create_predictor(prefix, use_gpu=False, ir_optim=False, onednn=False)
    return run_predictor(predictor, batch)


# ------------------------------------------------------------------------ reconstructions
def reconstruct(model, images, seed=0, method=None):
    """(masked input, reconstruction, mask) of a pretraining model, each [B, 3, H, W] in the
    model's normalised space; mask 1 = hidden. ``method`` (default: the method of the model name
    in ``model.preprocess_config``, set by :func:`paddle_cae.api.load_checkpoint`) draws the mask
    and undoes its target normalisation."""
    from ..methods import get_method, method_for

    if method is None:
        name = (getattr(model, "preprocess_config", None) or {}).get("model")
        if name is None:
            raise ValueError(f"{type(model).__name__}: cannot tell its pretraining method (no model "
                             "name in its preprocess_config); pass method=")
        method = method_for(name)
    model.eval()
    paddle.seed(seed)
    with paddle.no_grad():
        return get_method(method).reconstruct(model, images, seed)


def reconstruction_figure(images, masked, recon, mask, mean, std, scale=4):
    """One row per image: original | masked | reconstruction | reconstruction + visible, as a
    PIL image with labelled panels."""
    mean = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(std, np.float32).reshape(1, 3, 1, 1)

    def to_uint8(t):
        x = np.asarray(t.numpy() if hasattr(t, "numpy") else t) * std + mean
        return (np.clip(x, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)

    m = np.asarray(mask.numpy())
    blend = np.asarray(images.numpy()) * (1 - m) + np.asarray(recon.numpy()) * m
    panels = [to_uint8(images), to_uint8(masked), to_uint8(recon), to_uint8(blend)]
    titles = ["original", "masked", "reconstruction", "reconstruction + visible"]
    b, h, w, _ = panels[0].shape
    ph, pw = h * scale, w * scale
    label = 14
    canvas = Image.new("RGB", (4 * pw + 5 * 4, b * (ph + label) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for row in range(b):
        for col, panel in enumerate(panels):
            tile = Image.fromarray(panel[row]).resize((pw, ph), Image.NEAREST)
            x, y = 4 + col * (pw + 4), row * (ph + label) + label
            canvas.paste(tile, (x, y))
            if row == 0:
                draw.text((x, 1), titles[col], fill="black")
    return canvas


__all__ = ["ImageInputError", "export_inference_model", "format_prediction", "image_paths",
           "predictions_json", "resolve_device", "topk_records",
           "preprocessing", "preprocessing_spec", "readable_images", "read_image", "reconstruct", "reconstruction_figure",
           "run_inference_model", "to_batch", "topk_predictions"]
