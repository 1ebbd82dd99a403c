"""Training-step throughput and model FLOP utilisation of UperNet on a ViT encoder (the
segmentation recipe's network, optimizer and step), on random crops.

    python -m paddle_cae.downstream.bench --model cae_base_patch16_224 --crop_size 512 \\
        --batch_size 1 --steps 2 [--amp_dtype float16]

FLOPs: the package's counter (:mod:`paddle_cae.fast.flops`: linear, conv, attention matmuls)
plus the neck's transposed convolutions (counted here: in-pixels x C_in x C_out x k^2 MACs), x3 for
a training step. Peak: the best fp32 (or the --amp dtype) matmul rate of a 2048^3 product on the
same device and threads. MFU = step FLOPs / step time / peak.
"""
import argparse
import json
import os
import sys
import time


def deconv_macs(model, images_shape):
    """MACs of the neck's Conv2DTranspose layers for an input of ``images_shape``."""
    import paddle.nn as nn

    b, _, h, w = images_shape
    p = model.backbone.patch_embed.patch_size
    p = p[0] if isinstance(p, (tuple, list)) else p
    gh, gw = h // p, w // p
    total = 0
    for level in (model.neck.fpn1, model.neck.fpn2, model.neck.fpn3, model.neck.fpn4):
        size = (gh, gw)
        for layer in (level if isinstance(level, nn.Sequential) else [level]):
            if isinstance(layer, nn.Conv2DTranspose):
                cin, cout = layer.weight.shape[0], layer.weight.shape[1]
                k = layer.weight.shape[2] * layer.weight.shape[3]
                total += b * size[0] * size[1] * cin * cout * k
                size = (size[0] * 2, size[1] * 2)
    return total


def matmul_peak_gflops(paddle, dtype="float32", size=2048, repeats=3):
    a = paddle.randn([size, size]).astype(dtype)
    b = paddle.randn([size, size]).astype(dtype)
    paddle.matmul(a, b).numpy()
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        paddle.matmul(a, b).numpy()
        best = max(best, 2 * size ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m paddle_cae.downstream.bench")
    parser.add_argument("--model", default="cae_base_patch16_224")
    parser.add_argument("--crop_size", type=int, default=512)
    parser.add_argument("--num_classes", type=int, default=150)
    parser.add_argument("--channels", type=int, default=768)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    parser.add_argument("--amp_dtype", default=None, help="float16 / bfloat16 autocast (GPU)")
    args = parser.parse_args(argv)

    import numpy as np
    import paddle

    from ..engine.stepper import Stepper
    from ..runtime.amp import Precision
    from ..fast import accelerate, accelerate_optimizer
    from ..fast.flops import count_flops
    from .optim import build_segmentation_optimizer
    from .seg_args import build_network
    from .seg_engine import segmentation_loss

    config = {"model": args.model, "model_args": {}, "crop_size": args.crop_size,
              "num_classes": args.num_classes, "channels": args.channels, "out_indices": None,
              "rel_pos_bias": True, "drop_path": 0.1}
    model = accelerate(build_network(config))
    opt_args = argparse.Namespace(weight_decay=0.05, layer_decay=0.65, lr=1e-4, opt_betas=[0.9, 0.999],
                                  opt_eps=1e-8)
    optimizer = accelerate_optimizer(build_segmentation_optimizer(model, opt_args))
    precision = Precision(args.amp_dtype)
    stepper = Stepper(model, optimizer, precision, 1, None)
    shape = [args.batch_size, 3, args.crop_size, args.crop_size]
    rng = np.random.RandomState(0)
    images = paddle.to_tensor(rng.randn(*shape).astype("float32"))
    labels = paddle.to_tensor(rng.randint(0, args.num_classes, size=[shape[0]] + shape[2:]).astype("int64"))
    model.train()

    def step():
        with precision.autocast():
            logits = model(images)
        loss, _ = segmentation_loss(logits, labels, 0.4)
        stepper.backward(loss, 0)
        return float(loss.item())

    with count_flops() as counter:
        step()  # warm-up, counted
    flops = counter.train_step() + 3 * 2 * deconv_macs(model, shape)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    seconds = float(np.median(times))
    peak = matmul_peak_gflops(paddle, args.amp_dtype or "float32")
    row = {"model": args.model, "crop": args.crop_size, "batch_size": args.batch_size,
           "device": paddle.device.get_device(), "threads": os.environ.get("OMP_NUM_THREADS"),
           "amp": precision.dtype or "fp32", "step_s": round(seconds, 3),
           "images_per_s": round(args.batch_size / seconds, 4),
           "step_tflop": round(flops / 1e12, 3), "achieved_gflops": round(flops / seconds / 1e9, 1),
           "matmul_peak_gflops": round(peak, 1), "mfu_pct": round(100 * flops / seconds / 1e9 / peak, 1),
           "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    from ..startup import prepare_process

    prepare_process()
    sys.exit(main())
