"""AdamW with PyTorch's numerics.

``paddle.optimizer.AdamW`` keeps the bias-correction powers ``beta ** t`` in float32, so
``1 - beta2 ** t`` (about 1e-3 early on) carries a relative error near 1e-5 and the first
updates drift from PyTorch's by a few 1e-6. Here the corrections are computed in float64 each
step, as PyTorch does:

    p <- p * (1 - lr * wd)                      (decoupled decay)
    m <- b1 * m + (1 - b1) * g
    v <- b2 * v + (1 - b2) * g * g
    p <- p - lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)

On the CPU in float32 the plain path runs as one multi-threaded kernel
(``paddle_cae.ops.fused.adamw_update_``) with the same float32 arithmetic; it differs only where
Paddle's own CPU sqrt is not correctly rounded (last bit of the parameters).

``fused=True`` feeds Paddle's fused kernel instead (about 3x faster on CPU): zero beta powers
so it applies no correction of its own, the corrections folded into its step size and epsilon,
and its float32 ``1 - beta`` factors compensated. It matches the plain path to ~1e-6 over the
first steps; over long runs its second moment averages with ``float32(beta2)`` (a 1.3e-8
different rate), a relative drift of order 1e-5 in ``v``.
"""
import math

import numpy as np
import paddle

from ..ops import fused as fused_ops
from .base import GroupOptimizer

try:  # the fused kernel is an internal API; the plain path needs none of it
    from paddle import _C_ops

    _HAS_FUSED = hasattr(_C_ops, "adamw_")
except ImportError:  # pragma: no cover
    _C_ops = None
    _HAS_FUSED = False


class AdamW(GroupOptimizer):
    state_tensors = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 fused=False):
        super().__init__(params, lr, {"betas": tuple(betas), "eps": float(eps),
                                      "weight_decay": float(weight_decay)})
        self.fused = bool(fused) and _HAS_FUSED
        self._zero_pows = None

    def _update(self, param, grad, group, state):
        if not state:
            state["step"] = 0
            state["exp_avg"] = paddle.zeros_like(param)
            state["exp_avg_sq"] = paddle.zeros_like(param)
        state["step"] += 1
        step = state["step"]
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        bias_correction1 = 1.0 - beta1 ** step
        bias_correction2 = 1.0 - beta2 ** step
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if self.fused and param.dtype == paddle.float32 and grad.dtype == paddle.float32:
            self._fused_update(param, grad, exp_avg, exp_avg_sq, lr, wd, eps, beta1, beta2,
                               bias_correction1, bias_correction2)
            return
        if fused_ops.adamw_update_(param, grad, exp_avg, exp_avg_sq, lr, wd, beta1, beta2, eps,
                                   bias_correction1, bias_correction2):
            return  # the same arithmetic in one multi-threaded pass (paddle_cae/ops)
        if wd != 0.0:
            param.scale_(1.0 - lr * wd)
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.scale_(beta2).add_(paddle.square(grad).scale_(1.0 - beta2))
        denom = paddle.sqrt(exp_avg_sq) / math.sqrt(bias_correction2) + eps
        param.add_((exp_avg / denom).scale_(-lr / bias_correction1))

    def _fused_update(self, param, grad, exp_avg, exp_avg_sq, lr, wd, eps, beta1, beta2,
                      bias_correction1, bias_correction2):
        if self._zero_pows is None:
            self._zero_pows = (paddle.zeros([1], "float32"), paddle.zeros([1], "float32"))
        # The kernel forms (1 - beta) from float32 betas: 1 - float32(0.999) is 1.3e-5 off in
        # relative terms, so its moments are c * (PyTorch's moments); undo that in lr and eps.
        c1 = (1.0 - float(np.float32(beta1))) / (1.0 - beta1)
        c2 = (1.0 - float(np.float32(beta2))) / (1.0 - beta2)
        sqrt_bc2 = math.sqrt(c2 * bias_correction2)
        lr_t = lr * sqrt_bc2 / (bias_correction1 * c1)
        # the kernel decays by lr_t * coeff: choose coeff so that this is lr * wd
        coeff = lr * wd / lr_t if lr_t != 0.0 else 0.0
        lr_tensor = paddle.to_tensor([lr_t], dtype="float32")
        beta1_pow, beta2_pow = self._zero_pows
        _C_ops.adamw_(
            param, grad, lr_tensor, exp_avg, exp_avg_sq, None, beta1_pow, beta2_pow, None, None,
            beta1, beta2, eps * sqrt_bc2, 1.0, coeff, coeff != 0.0, False, 1000, False, False,
            False,
        )
