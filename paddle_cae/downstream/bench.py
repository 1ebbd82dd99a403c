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


def build_step(model="cae_base_patch16_224", crop_size=512, num_classes=150, channels=768,
               batch_size=1, amp_dtype=None, model_args=None, seed=0):
    """One training step of the segmentation recipe (encoder + neck + UperNet with its auxiliary
    head, layer-decayed AdamW, the shared :class:`Stepper`) on a fixed random batch.

    Returns ``(network, stepper, step, images_shape)``; ``step()`` runs one step and returns the
    loss. Needs paddleseg (the UperNet head): without it the ImportError names the install.
    Used by ``main`` below and by ``benchmarks/gpu_check.py`` (its UperNet row)."""
    import numpy as np
    import paddle

    from ..engine.stepper import Stepper
    from ..runtime.amp import Precision
    from ..fast import accelerate, accelerate_optimizer
    from .optim import build_segmentation_optimizer
    from .seg_args import build_network
    from .seg_engine import segmentation_loss

    paddle.seed(seed)
    config = {"model": model, "model_args": dict(model_args or {}), "crop_size": crop_size,
              "num_classes": num_classes, "channels": channels, "out_indices": None,
              "rel_pos_bias": True, "drop_path": 0.1}
    network = accelerate(build_network(config))
    opt_args = argparse.Namespace(weight_decay=0.05, layer_decay=0.65, lr=1e-4, opt_betas=[0.9, 0.999],
                                  opt_eps=1e-8)
    optimizer = accelerate_optimizer(build_segmentation_optimizer(network, opt_args))
    precision = Precision(amp_dtype)
    stepper = Stepper(network, optimizer, precision, 1, None)
    shape = [batch_size, 3, crop_size, crop_size]
    rng = np.random.RandomState(seed)
    images = paddle.to_tensor(rng.randn(*shape).astype("float32"))
    labels = paddle.to_tensor(rng.randint(0, num_classes, size=[shape[0]] + shape[2:]).astype("int64"))
    network.train()

    def step():
        with precision.autocast():
            logits = network(images)
        loss, _ = segmentation_loss(logits, labels, 0.4)
        stepper.backward(loss, 0)
        return loss

    return network, stepper, step, shape


def counted_step(network, step, shape):
    """Run ``step`` once (a warm-up) and return the FLOPs of a training step: the package's
    counter (x3 for forward + backward of what trains) plus the neck's transposed convolutions."""
    from ..fast.flops import count_flops

    with count_flops() as counter:
        step()
    return counter.train_step() + 3 * 2 * deconv_macs(network, shape)


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

    network, stepper, step, shape = build_step(args.model, args.crop_size, args.num_classes,
                                               args.channels, args.batch_size, args.amp_dtype)
    flops = counted_step(network, step, shape)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        float(step().item())
        times.append(time.perf_counter() - t)
    seconds = float(np.median(times))
    peak = matmul_peak_gflops(paddle, args.amp_dtype or "float32")
    row = {"model": args.model, "crop": args.crop_size, "batch_size": args.batch_size,
           "device": paddle.device.get_device(), "threads": os.environ.get("OMP_NUM_THREADS"),
           "amp": stepper.precision.dtype or "fp32", "step_s": round(seconds, 3),
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
