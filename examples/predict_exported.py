"""Run a model exported by ``main_infer.py --export DIR`` with Paddle Inference on one image and
print its top-5 classes exactly as ``main_infer.py`` does. Needs only paddle, numpy and Pillow
(not paddle_cae): the preprocessing is read from ``DIR/preprocess.json``.

    python main_infer.py --resume output/demo_finetune_mae/checkpoint-best.pd --export exported/
    python examples/predict_exported.py exported/ demo/digits/val/3/0003.png
"""
import json
import os
import sys

import numpy as np
from PIL import Image


def load_preprocess(model_dir):
    with open(os.path.join(model_dir, "preprocess.json"), encoding="utf-8") as f:
        return json.load(f)


def preprocess(path, spec):
    """RGB image -> float32 [1, 3, crop, crop] as the evaluation transform of training."""
    img = Image.open(path).convert("RGB")
    width, height = img.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = spec["resize_short"], int(spec["resize_short"] * long / short)
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    if size != img.size:
        img = img.resize(size, Image.BICUBIC)
    crop = spec["crop_size"]
    width, height = img.size
    if crop > width or crop > height:  # pad with black, centred
        canvas = Image.new("RGB", (max(width, crop), max(height, crop)))
        canvas.paste(img, ((max(width, crop) - width) // 2, (max(height, crop) - height) // 2))
        img, (width, height) = canvas, canvas.size
    top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))
    img = img.crop((left, top, left + crop, top + crop))
    chw = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean = np.asarray(spec["mean"], np.float32).reshape(3, 1, 1)
    std = np.asarray(spec["std"], np.float32).reshape(3, 1, 1)
    return ((chw - mean) / std).astype(np.float32)[None]


def create_predictor(model_dir):
    from paddle import inference

    prefix = os.path.join(model_dir, "inference")
    program = prefix + (".json" if os.path.isfile(prefix + ".json") else ".pdmodel")
    config = inference.Config(program, prefix + ".pdiparams")
    config.disable_gpu()
    config.switch_ir_optim(False)  # the numerics of the training framework
    config.disable_glog_info()
    return inference.create_predictor(config)


def predict(predictor, batch):
    handle = predictor.get_input_handle(predictor.get_input_names()[0])
    handle.reshape(list(batch.shape))
    handle.copy_from_cpu(np.ascontiguousarray(batch))
    predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()


def top5_lines(logits, class_names, k=5):
    z = logits[0].astype(np.float32)
    probs = np.exp(z - z.max())
    probs = probs / probs.sum()
    order = np.argsort(-probs, kind="stable")[:k]
    lines = []
    for i in order:
        name = class_names[i] if i < len(class_names) else str(i)
        lines.append(f"{[n.strip() for n in name.split(',')]!r}: {float(probs[i])}")
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python examples/predict_exported.py EXPORT_DIR IMAGE", file=sys.stderr)
        return 2
    model_dir, image = argv
    spec = load_preprocess(model_dir)
    logits = predict(create_predictor(model_dir), preprocess(image, spec))
    print("Inference results:")
    for line in top5_lines(logits, spec.get("class_names") or []):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
