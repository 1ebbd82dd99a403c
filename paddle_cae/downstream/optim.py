"""The optimizer and schedule of the official segmentation recipes.

AdamW over layer-decayed parameter groups (the official ``LayerDecayOptimizerConstructor``:
``scale = layer_decay ** (depth + 1 - layer id)``, ids from :meth:`Segmentor.layer_id`; 1-D
tensors and biases without weight decay), and mmcv's ``poly`` schedule with linear warm-up,
per iteration ``t`` (0-based)::

    lr(t) = (lr - min_lr) * (1 - t / iters) ** power + min_lr
    t < warmup_iters:  lr(t) *= 1 - (1 - t / warmup_iters) * (1 - warmup_ratio)

Every group gets ``lr(t)`` times its ``lr_scale``.
"""
from ..optim import build_optimizer, param_groups


def poly_lr(iteration, lr, iters, power=1.0, min_lr=0.0, warmup_iters=0, warmup_ratio=1e-6):
    value = (lr - min_lr) * (1.0 - iteration / iters) ** power + min_lr
    if iteration < warmup_iters:
        value *= 1.0 - (1.0 - iteration / warmup_iters) * (1.0 - warmup_ratio)
    return value


def segmentation_groups(model, weight_decay, layer_decay):
    return param_groups(model, weight_decay, layer_decay=layer_decay, rule="beit")


def build_segmentation_optimizer(model, args):
    groups = segmentation_groups(model, args.weight_decay, args.layer_decay)
    return build_optimizer("adamw", groups, lr=args.lr, betas=tuple(args.opt_betas),
                           eps=args.opt_eps, weight_decay=args.weight_decay)


__all__ = ["build_segmentation_optimizer", "poly_lr", "segmentation_groups"]
