"""Run a model exported by ``main_infer.py --export DIR`` with Paddle Inference on images and
print their top-5 classes exactly as ``main_infer.py`` does (``--json`` for the machine-readable
form). Needs only paddle, numpy and Pillow (not paddle_cae): the preprocessing is read from
``DIR/preprocess.json``.

    python main_infer.py --resume output/demo_finetune_mae/checkpoint-best.pd --export exported/
    python examples/predict_exported.py exported/ demo/digits/val/3/0003.png [--json] [--device cpu]
"""
import argparse
import contextlib
import json
import os
import sys
import warnings

# Paddle's notes (its C++ INFO/WARNING log, the import's missing-ccache warning) say nothing a
# user can act on here; GLOG_minloglevel=0 shows the log again
os.environ.setdefault("GLOG_minloglevel", "2")
warnings.filterwarnings("ignore", message="No ccache found")

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


def resolve_device(device):
    """None -> gpu when Paddle is built with CUDA, else cpu; cuda[:N] is gpu[:N]. Returns
    (kind, gpu id); a GPU asked of a CPU-only Paddle is a ValueError naming the device as given."""
    import paddle

    if device is None:
        return ("gpu", 0) if paddle.is_compiled_with_cuda() else ("cpu", 0)
    name = device.strip().lower()
    kind, _, index = name.partition(":")
    kind = "gpu" if kind == "cuda" else kind
    if kind not in ("cpu", "gpu") or (index and not index.isdigit()):
        raise ValueError(f"--device {device}: expected cpu, gpu, gpu:N, cuda or cuda:N")
    if kind == "gpu" and not paddle.is_compiled_with_cuda():
        raise ValueError(f"--device {device}: this Paddle build has no CUDA support (paddle "
                         f"{paddle.__version__}, CPU-only); use --device cpu, or install a CUDA build")
    return kind, int(index or 0)


@contextlib.contextmanager
def native_stdout_silenced():
    """fd 1 to the null device for the block: Paddle's C++ code prints notes straight to it
    (``ReduceMeanCheckIfOneDNNSupport``)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def create_predictor(model_dir, device=("cpu", 0)):
    from paddle import inference

    prefix = os.path.join(model_dir, "inference")
    program = prefix + (".json" if os.path.isfile(prefix + ".json") else ".pdmodel")
    config = inference.Config(program, prefix + ".pdiparams")
    if device[0] == "gpu":
        config.enable_use_gpu(256, device[1])
    else:
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


def top_k(logits, class_names, k=5):
    """logits [1, C] -> the top-k ``{"class_id", "class_name", "prob"}`` records (softmax)."""
    z = logits[0].astype(np.float32)
    probs = np.exp(z - z.max())
    probs = probs / probs.sum()
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"class_id": int(i), "class_name": class_names[i] if i < len(class_names) else str(i),
             "prob": float(probs[i])} for i in order]


def text_lines(records):
    """As main_infer.py prints them: ``  1. Persian cat (class 283)  88.68%``."""
    return [f"{rank:>3}. {r['class_name']} (class {r['class_id']})  {100.0 * r['prob']:6.2f}%"
            for rank, r in enumerate(records, 1)]


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="predict_exported.py", description="Top-5 classes of images with an exported model.")
    parser.add_argument("model_dir", metavar="EXPORT_DIR", help="the folder main_infer.py --export wrote")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="image files")
    parser.add_argument("--json", action="store_true", help="print a JSON list: {\"image\", "
                        "\"predictions\": [{\"class_id\", \"class_name\", \"prob\"}]} per image")
    parser.add_argument("--device", default=None, help="cpu, gpu, gpu:N (cuda[:N] accepted); "
                        "default: gpu when Paddle is built with CUDA")
    parser.add_argument("--topk", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        spec = load_preprocess(args.model_dir)
        names = spec.get("class_names") or []
        with native_stdout_silenced():
            predictor = create_predictor(args.model_dir, device)
            results = [{"image": image, "predictions": top_k(predict(predictor, preprocess(image, spec)),
                                                              names, args.topk)} for image in args.images]
    except (OSError, ValueError) as err:
        print(f"predict_exported.py: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"Inference results (top-{len(results[0]['predictions'])} per image):")
    for result in results:
        print(f"{result['image']}:")
        for line in text_lines(result["predictions"]):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
