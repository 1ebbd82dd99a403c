"""Train (and evaluate) a PaddleDetection detector from a self-contained YAML of
``configs/detection/`` with the installed ``paddledet``: the same steps as PaddleDetection's
``tools/train.py`` (which the pip package does not ship), nothing else.

    python -m paddle_cae.downstream.train_detection -c configs/detection/mask_rcnn_vit_base_1x_coco.yaml \\
        -o VisionTransformer.pretrained=vit_base_ppdet.pdparams TrainDataset.dataset_dir=/data/coco \\
        EvalDataset.dataset_dir=/data/coco [--eval]
    python -m paddle.distributed.launch --gpus 0,1,2,3,4,5,6,7 -m paddle_cae.downstream.train_detection ...

Also: a tiny COCO-format instance set made from the bundled digits (``make_digit_coco``), for
checking that a config trains on a CPU.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from . import require


def parse_overrides(items):
    """``A.B=value`` strings -> nested dict, values read as YAML (numbers, lists, booleans)."""
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"-o {item!r}: expected KEY=VALUE (e.g. TrainReader.batch_size=2)")
        key, value = item.split("=", 1)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def _merge(target, overrides):
    """Nested merge into PaddleDetection's config: dicts recursively, the dataset objects of the
    YAML tags (``!COCODataSet``) attribute by attribute, anything else replaced."""
    for key, value in overrides.items():
        current = target.get(key) if isinstance(target, dict) else getattr(target, key, None)
        if isinstance(value, dict) and current is not None and (
                isinstance(current, dict) or hasattr(current, "__dict__")):
            _merge(current, value)
        elif isinstance(target, dict):
            target[key] = value
        else:
            setattr(target, key, value)


def load_detection_config(path, overrides=None):
    """PaddleDetection's global config from ``path`` with ``overrides`` (a nested dict) merged."""
    workspace = require("ppdet.core.workspace")
    cfg = workspace.load_config(path)
    if overrides:
        _merge(cfg, overrides)
    return cfg


def train(cfg, validate=False, device=None):
    """PaddleDetection's Trainer on ``cfg``, as its tools/train.py runs it. Returns the trainer."""
    import paddle

    engine = require("ppdet.engine")
    from . import ppdet_compat

    ppdet_compat.apply()
    if device is None:
        device = "gpu" if cfg.get("use_gpu", False) and paddle.device.is_compiled_with_cuda() else "cpu"
    cfg["use_gpu"] = device == "gpu"
    paddle.set_device(device)
    if cfg.get("norm_type") == "sync_bn" and (device == "cpu" or paddle.distributed.get_world_size() < 2):
        cfg["norm_type"] = "bn"  # what tools/train.py does outside multi-GPU runs
    trainer = engine.Trainer(cfg, mode="train")
    if cfg.get("pretrain_weights"):
        trainer.load_weights(cfg.pretrain_weights)
    trainer.train(validate)
    return trainer


# ----------------------------------------------------------------------- tiny digit COCO
def make_digit_coco(out_dir, count=2, canvas=128, seed=0, split="train"):
    """``count`` canvases with 2-3 digits each, as a COCO instance set (boxes, one polygon per
    digit: the outline of its stroke's bounding box; categories 1..10 = digits 0..9)."""
    from ..data.datasets import default_data_path
    from .seg_data import _digit_files

    rng = np.random.RandomState(seed)
    digits = _digit_files(default_data_path(), "train")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        image = np.full((canvas, canvas, 3), 235, np.uint8)
        for _ in range(rng.randint(2, 4)):
            cls, path = digits[rng.randint(len(digits))]
            size = int(rng.randint(32, 56))
            grey = np.asarray(Image.open(path).convert("L").resize((size, size), Image.BILINEAR))
            y, x = int(rng.randint(0, canvas - size)), int(rng.randint(0, canvas - size))
            patch = image[y:y + size, x:x + size]
            np.minimum(patch, grey[..., None], out=patch)
            ys, xs = np.nonzero(grey < 128)
            if len(xs) == 0:
                continue
            x0, y0, x1, y1 = x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                                "area": float((x1 - x0) * (y1 - y0)), "iscrowd": 0,
                                "segmentation": [[float(x0), float(y0), float(x1), float(y0),
                                                  float(x1), float(y1), float(x0), float(y1)]]})
        name = f"{split}_{i:04d}.jpg"
        Image.fromarray(image).save(out / "images" / name, quality=95)
        images.append({"id": i + 1, "file_name": name, "width": canvas, "height": canvas})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]}
    anno = out / "annotations" / f"instances_{split}.json"
    anno.write_text(json.dumps(coco))
    return str(out), str(anno)


def main(argv=None):
    from ..startup import report_error

    parser = argparse.ArgumentParser(prog="python -m paddle_cae.downstream.train_detection",
                                     description="Train a detector of configs/detection/ with paddledet")
    parser.add_argument("-c", "--config", required=True, help="a YAML of configs/detection/")
    parser.add_argument("-o", "--opt", nargs="*", default=[], help="overrides KEY=VALUE (dots nest)")
    parser.add_argument("--eval", action="store_true", help="evaluate after every snapshot epoch")
    parser.add_argument("--device", default=None, help="gpu or cpu (default: gpu when use_gpu and CUDA)")
    args = parser.parse_args(argv)
    try:
        if not os.path.isfile(args.config):
            raise FileNotFoundError(f"--config {args.config}: no such file")
        cfg = load_detection_config(args.config, parse_overrides(args.opt))
        train(cfg, args.eval, args.device)
    except (FileNotFoundError, ValueError, KeyError, ImportError) as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    from ..startup import prepare_process

    prepare_process()
    sys.exit(main())
