"""Predict the classes of images with a fine-tuned checkpoint, export it for deployment, or
picture what a MAE/BootMAE pretraining checkpoint reconstructs.

    python main_infer.py --model vit_base_patch16 --resume output/finetune/checkpoint-best.pd \\
        --img_path demo/digits/val/3/0003.png          # a file or a folder (batched)
    python main_infer.py --resume CKPT --export exported/           # paddle.jit.save + check
    python main_infer.py --resume output/demo_mae/checkpoint-2.pd --img_path IMG --visualize out.png

Prints, per image, the top-5 classes with their probabilities:

    Inference results:
    ['Persian cat']: 0.8868908882141113
"""
import argparse
import os
import sys

from paddle_cae.startup import prepare_process  # noqa: E402  (before paddle is imported)

prepare_process()  # OMP_NUM_THREADS: yours, else 1 (README "Threads"); no ccache warning

import numpy as np  # noqa: E402

from paddle_cae.api import load_checkpoint, predict  # noqa: E402
from paddle_cae.engine.infer import (ImageInputError, export_inference_model, format_prediction,  # noqa: E402
                                     image_paths, preprocessing, read_image, reconstruct,
                                     reconstruction_figure, run_inference_model, to_batch)
from paddle_cae.runtime.checkpoint import CheckpointError  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(
        prog="main_infer.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Top-k predictions, inference-model export and reconstruction pictures.",
        epilog="Checkpoints of this package carry their network and class names; for an official "
               "fine-tuned .pth give --model (ImageNet class names are used for 1000 classes).")
    parser.add_argument("--model", default=None, help="classifier name (checked against the checkpoint; "
                        "required for official .pth files)")
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
    parser.add_argument("--device", default="cpu", help="cpu or gpu")
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
    note = ""
    if getattr(model, "norm_pix_loss", False) or hasattr(model, "forward_predictions"):
        note = (" (the model predicts per-patch normalised pixels: the picture is de-normalised with "
                "each patch's true mean and std)")
    print(f"saved {args.visualize}: original | masked | reconstruction | reconstruction + visible{note}")


def export(model, args):
    config = getattr(model, "preprocess_config", {}) or {}
    size = int(config.get("input_size", 224))
    names = "\n".join(getattr(model, "class_names", []) or []) + "\n"
    prefix = export_inference_model(model, args.export, size, {"class_names.txt": names})
    check = np.random.RandomState(0).standard_normal((2, 3, size, size)).astype("float32")
    import paddle

    with paddle.no_grad():
        expected = model(paddle.to_tensor(check)).numpy()
    got = run_inference_model(prefix, check)
    diff = float(np.abs(got - expected).max())
    print(f"exported {prefix} (input [N, 3, {size}, {size}]); paddle.inference vs dynamic graph: "
          f"max |logit difference| {diff:.2e}")
    if diff > 1e-4:
        raise ValueError(f"exported model differs from the dynamic one by {diff:.2e}")


def run(args):
    import paddle

    paddle.set_device(args.device)
    model = load_checkpoint(args.resume, model_name=args.model)
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
        for path in paths:  # fail on a bad file before any output
            read_image(path)
        results = predict(model, paths, topk=args.topk, batch_size=args.batch_size)
        print("Inference results:")
        for path, pairs in zip(paths, results):
            if len(paths) > 1:
                print(f"{path}:")
            for line in format_prediction(pairs):
                print(line)
    elif not args.export:
        raise ValueError("nothing to do: give --img_path, --export or --visualize")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (CheckpointError, ImageInputError, ValueError, KeyError, FileNotFoundError) as err:
        message = str(err).strip().splitlines()
        print(f"error: {message[0] if message else type(err).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
