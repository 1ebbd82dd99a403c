"""What ``main_infer.py`` does, importable (``paddle-cae-infer`` runs it too): top-k predictions,
inference-model export with its preprocessing, reconstruction pictures."""
import argparse
import json
import os
import sys

import numpy as np

from ..api import load_checkpoint, predict_batch
from ..inference.predict import (ImageInputError, export_inference_model, format_prediction, image_paths,
                                 predictions_json, preprocessing, preprocessing_spec, read_image,
                                 readable_images, reconstruct, reconstruction_figure, resolve_device,
                                 run_inference_model, to_batch, topk_records)
from ..methods import method_for
from ..runtime.checkpoint import CheckpointError
from ..startup import native_stdout_silenced, report_error

PREPROCESS_FILE = "preprocess.json"


def build_parser(prog="main_infer.py"):
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Top-k predictions, inference-model export and reconstruction pictures.",
        epilog="Checkpoints of this package carry their network and class names; for an official "
               "fine-tuned .pth give --model (ImageNet class names are used for 1000 classes).")
    parser.add_argument("--model", default=None, help="classifier name (checked against the checkpoint; "
                        "required for official .pth files)")
    parser.add_argument("--model_args", default=None, metavar="JSON",
                        help="constructor arguments for --model with an official/converted file, "
                             "e.g. '{\"embed_dim\": 384}' (this package's checkpoints carry theirs)")
    parser.add_argument("--resume", required=True, metavar="CKPT",
                        help="fine-tuned / linear-probe checkpoint (or a pretraining checkpoint with "
                             "--visualize)")
    parser.add_argument("--img_path", default=None, help="an image, or a folder of images (batched)")
    parser.add_argument("--topk", type=int, default=5, help="how many classes to print per image")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="write a paddle.jit.save inference model (DIR/inference.json + "
                             ".pdiparams) and check it against the dynamic model")
    parser.add_argument("--visualize", default=None, metavar="OUT.png",
                        help="MAE/BootMAE pretraining checkpoints: save original | masked | "
                             "reconstruction | reconstruction + visible for --img_path")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random mask for --visualize")
    parser.add_argument("--json", action="store_true",
                        help="print the predictions as JSON: a list with {\"image\": path, \"predictions\": "
                             "[{\"class_id\", \"class_name\", \"prob\"}, ...]} per image")
    parser.add_argument("--device", default=None,
                        help="cpu, gpu, gpu:N (cuda, cuda:N accepted); default: gpu when Paddle is "
                             "built with CUDA, else cpu")
    return parser


def visualize(model, args):
    if getattr(model, "checkpoint_kind", None) != "pretrain":
        raise ValueError(f"--visualize needs a pretraining checkpoint with its decoder; {args.resume} "
                         "is a classifier")
    config = model.preprocess_config
    paths = image_paths(args.img_path)[:8]
    batch = to_batch(paths, preprocessing(config))
    masked, recon, mask = reconstruct(model, batch, seed=args.seed)
    figure = reconstruction_figure(batch, masked, recon, mask, config["mean"], config["std"])
    os.makedirs(os.path.dirname(os.path.abspath(args.visualize)), exist_ok=True)
    figure.save(args.visualize)
    note = method_for(config["model"]).reconstruction_note(model)
    note = f" ({note})" if note else ""
    print(f"saved {args.visualize}: original | masked | reconstruction | reconstruction + visible{note}")


def export(model, args):
    config = getattr(model, "preprocess_config", {}) or {}
    spec = preprocessing_spec(config)
    size = spec["crop_size"]
    class_names = list(getattr(model, "class_names", []) or [])
    names = "\n".join(class_names) + "\n"
    preprocess = dict(spec, class_names=class_names, input_name="images",
                      model=getattr(model, "model_name", None) or config.get("model"),
                      source_checkpoint=os.path.abspath(args.resume))
    with native_stdout_silenced():  # Paddle's C++ notes while tracing and loading the program
        prefix = export_inference_model(model, args.export, size, {
            "class_names.txt": names, PREPROCESS_FILE: json.dumps(preprocess, indent=2) + "\n"})
    check = np.random.RandomState(0).standard_normal((2, 3, size, size)).astype("float32")
    import paddle

    with paddle.no_grad():
        expected = model(paddle.to_tensor(check)).numpy()
    with native_stdout_silenced():
        got = run_inference_model(prefix, check)
    diff = float(np.abs(got - expected).max())
    out = sys.stderr if getattr(args, "json", False) else sys.stdout  # stdout stays pure JSON
    print(f"exported {prefix} (input [N, 3, {size}, {size}]); paddle.inference vs dynamic graph: "
          f"max |logit difference| {diff:.2e}", file=out)
    print(f"preprocessing and class names: {os.path.join(args.export, PREPROCESS_FILE)} "
          "(examples/predict_exported.py runs the export with Paddle Inference)", file=out)
    if diff > 1e-4:
        raise ValueError(f"exported model differs from the dynamic one by {diff:.2e}")


def run(args):
    import paddle

    paddle.set_device(resolve_device(args.device))
    model_args = None
    if args.model_args:
        try:
            model_args = json.loads(args.model_args)
        except json.JSONDecodeError as err:
            raise ValueError(f"--model_args is not valid JSON ({err.msg}): {args.model_args}") from None
    model = load_checkpoint(args.resume, model_name=args.model, model_args=model_args)
    if args.visualize:
        if not args.img_path:
            raise ValueError("--visualize needs --img_path")
        return visualize(model, args)
    if getattr(model, "checkpoint_kind", None) == "pretrain":
        raise ValueError(f"{args.resume} is a pretraining checkpoint: it has no classifier. Fine-tune it "
                         "first, or use --visualize to see its reconstructions")
    if args.export:
        export(model, args)
    if args.img_path:
        paths = image_paths(args.img_path)
        if len(paths) == 1:
            read_image(paths[0])  # one file: a bad one is the error
        paths, bad = readable_images(paths)
        for path, reason in bad:
            print(f"skipped {reason}", file=sys.stderr)
        if not paths:
            raise ImageInputError(f"{args.img_path}: none of its {len(bad)} files is a readable image")
        records = topk_records(predict_batch(model, paths, batch_size=args.batch_size),
                               getattr(model, "class_names", None), args.topk)
        if args.json:
            print(json.dumps(predictions_json(paths, records), indent=1))
        else:
            print("Inference results (top-%d per image):" % min(args.topk, len(records[0])))
            for path, recs in zip(paths, records):
                print(f"{path}:")
                for line in format_prediction(recs):
                    print(line)
        if bad:
            print(f"{len(bad)} of {len(paths) + len(bad)} files skipped (not readable images; listed "
                  "above on stderr)", file=sys.stderr)
    elif not args.export:
        raise ValueError("nothing to do: give --img_path, --export or --visualize")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (CheckpointError, ImageInputError, ValueError, KeyError, FileNotFoundError) as err:
        return report_error(err)
    return 0


__all__ = ["PREPROCESS_FILE", "build_parser", "main", "run"]
