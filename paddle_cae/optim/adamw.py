"""AdamW with PyTorch's numerics.

``paddle.optimizer.AdamW`` keeps the bias-correction powers ``beta ** t`` in float32, so
``1 - beta2 ** t`` (about 1e-3 early on) carries a relative error near 1e-5 and the first
updates drift from PyTorch's by a few 1e-6. Here the corrections are computed in float64 each
step, as PyTorch does:

    p <- p * (1 - lr * wd)                      (decoupled decay)
    m <- b1 * m + (1 - b1) * g
    v <- b2 * v + (1 - b2) * g * g
    p <- p - lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)

Where the per-tensor arithmetic would issue a dozen kernel launches per parameter,
``multi_tensor`` (on by default) updates all parameters of
a group that share a step count with ONE call of Paddle's multi-tensor ``fused_adam_`` kernel,
using the same folding of the float64 corrections as ``fused=True`` below (so it agrees with
the plain path to ~1e-6, as that one does). If the kernel is missing or refuses the call, the
plain path runs (with a warning, once).

``fused=True`` feeds Paddle's fused kernel instead: zero beta powers
so it applies no correction of its own, the corrections folded into its step size and epsilon,
and its float32 ``1 - beta`` factors compensated. It matches the plain path to ~1e-6 over the
first steps; over long runs its second moment averages with ``float32(beta2)`` (a 1.3e-8
different rate), a relative drift of order 1e-5 in ``v``.
"""
import logging
import math

import numpy as np
import paddle

from .base import GroupOptimizer

try:  # the fused kernel is an internal API; the plain path needs none of it
    from paddle import _C_ops

    _HAS_FUSED = hasattr(_C_ops, "adamw_")
    _HAS_MULTI = hasattr(_C_ops, "fused_adam_")
except ImportError:  # pragma: no cover
    _C_ops = None
    _HAS_FUSED = _HAS_MULTI = False

logger = logging.getLogger(__name__)
# the argument lists found on the first call: Paddle 3.x added moment2_max and amsgrad
_FUSED_ADAM_SIGNATURE = []
_ADAMW_SIGNATURE = []


class AdamW(GroupOptimizer):
    state_tensors = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 fused=False, multi_tensor=None):
        super().__init__(params, lr, {"betas": tuple(betas), "eps": float(eps),
                                      "weight_decay": float(weight_decay)})
        self.fused = bool(fused) and _HAS_FUSED
        # None: on wherever the per-tensor path is not preferred (see _multi_tensor_for)
        self.multi_tensor = multi_tensor
        self.multi_tensor_fallback = None  # why Paddle refused the multi-tensor call, if it did
        self._zero_pows = None
        self._zero_pow_lists = {}

    # ------------------------------------------------------------- multi-tensor path
    def _multi_tensor_for(self, param):
        if self.fused or self.multi_tensor is False or not _HAS_MULTI:
            return False
        return param.dtype == paddle.float32

    @paddle.no_grad()
    def step(self):
        if self.multi_tensor is False or self.fused or not _HAS_MULTI:
            return super().step()
        index = 0
        for group in self.param_groups:
            buckets = {}
            for p in group["params"]:
                i = index
                index += 1
                if p.stop_gradient or p.grad is None:
                    continue
                grad = p.grad
                state = self.state.setdefault(i, {})
                if not self._multi_tensor_for(p) or grad.dtype != paddle.float32:
                    self._update(p, grad, group, state)
                    continue
                _init_state(state, p)
                buckets.setdefault(state["step"], []).append((p, grad, state))
            for items in buckets.values():
                self._multi_update(items, group)

    def _multi_update(self, items, group):
        for _, _, state in items:
            state["step"] += 1
        step = items[0][2]["step"]
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        lr_t, eps_t, coeff = _paddle_kernel_scalars(lr, wd, eps, beta1, beta2,
                                                    1.0 - beta1 ** step, 1.0 - beta2 ** step)
        n = len(items)
        if n not in self._zero_pow_lists:
            # beta powers of 0: the kernel applies no correction of its own (0 * beta stays 0)
            self._zero_pow_lists[n] = ([paddle.zeros([1], "float32") for _ in range(n)],
                                       [paddle.zeros([1], "float32") for _ in range(n)])
        pow1, pow2 = self._zero_pow_lists[n]
        params = [p for p, _, _ in items]
        grads = [g for _, g, _ in items]
        m1 = [s["exp_avg"] for _, _, s in items]
        m2 = [s["exp_avg_sq"] for _, _, s in items]
        lr_tensor = paddle.full([1], lr_t, dtype="float32")  # a fill kernel, no host copy
        try:
            _fused_adam(params, grads, lr_tensor, m1, m2, pow1, pow2, beta1, beta2, eps_t, coeff)
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as err:
            reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
            self.multi_tensor_fallback = reason
            logger.error(
                "AdamW: this Paddle (%s) refused the multi-tensor update (%s); from now on every "
                "step updates the parameter tensors one at a time (about a dozen kernel launches "
                "each, %d tensors in this group): the same numbers, a slower optimizer step. "
                "See docs/GPU.md", paddle.__version__, reason, len(items))
            self.multi_tensor = False
            for _, _, state in items:
                state["step"] -= 1
            for p, g, state in items:
                self._update(p, g, group, state)

    def _update(self, param, grad, group, state):
        _init_state(state, param)
        state["step"] += 1
        step = state["step"]
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        bias_correction1 = 1.0 - beta1 ** step
        bias_correction2 = 1.0 - beta2 ** step
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        self._apply(param, grad, exp_avg, exp_avg_sq, lr, wd, eps, beta1, beta2,
                    bias_correction1, bias_correction2)

    def _apply(self, param, grad, exp_avg, exp_avg_sq, lr, wd, eps, beta1, beta2,
               bias_correction1, bias_correction2):
        """One parameter's update from its step's scalars (the moments updated in place)."""
        if self.fused and param.dtype == paddle.float32 and grad.dtype == paddle.float32:
            self._fused_update(param, grad, exp_avg, exp_avg_sq, lr, wd, eps, beta1, beta2,
                               bias_correction1, bias_correction2)
            return
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
        lr_t, eps_t, coeff = _paddle_kernel_scalars(lr, wd, eps, beta1, beta2, bias_correction1,
                                                    bias_correction2)
        lr_tensor = paddle.full([1], lr_t, dtype="float32")
        beta1_pow, beta2_pow = self._zero_pows
        args_3x = (param, grad, lr_tensor, exp_avg, exp_avg_sq, None, beta1_pow, beta2_pow, None,
                   None, beta1, beta2, eps_t, 1.0, coeff, coeff != 0.0, False, 1000,
                   False, False, False)
        # Paddle 2.6 has neither moment2_max (6th) nor amsgrad (last)
        args_26 = args_3x[:5] + args_3x[6:-1]
        _call_with_signature(_C_ops.adamw_, _ADAMW_SIGNATURE, args_3x, args_26)


def _init_state(state, param):
    """A parameter's state at its first update: step 0, zero moments."""
    if not state:
        state["step"] = 0
        state["exp_avg"] = paddle.zeros_like(param)
        state["exp_avg_sq"] = paddle.zeros_like(param)


def _paddle_kernel_scalars(lr, wd, eps, beta1, beta2, bias_correction1, bias_correction2):
    """(lr, eps, decay coefficient) to hand Paddle's adamw_ / fused_adam_ kernels, which get
    beta powers of 0 (no correction of their own), so that they make PyTorch's AdamW step.

    The kernels form (1 - beta) from float32 betas: 1 - float32(0.999) is 1.3e-5 off in
    relative terms, so their moments are c * (PyTorch's moments); that is undone in lr and eps.
    They decay by lr_t * coeff: coeff is chosen so that this is lr * wd."""
    c1 = (1.0 - float(np.float32(beta1))) / (1.0 - beta1)
    c2 = (1.0 - float(np.float32(beta2))) / (1.0 - beta2)
    sqrt_bc2 = math.sqrt(c2 * bias_correction2)
    lr_t = lr * sqrt_bc2 / (bias_correction1 * c1)
    coeff = lr * wd / lr_t if lr_t != 0.0 else 0.0
    return lr_t, eps * sqrt_bc2, coeff


def _fused_adam(params, grads, lr, m1, m2, pow1, pow2, beta1, beta2, eps, coeff):
    """Paddle's multi-tensor Adam(W) over lists, decoupled decay ``p *= 1 - lr * coeff``;
    the argument list of Paddle 3.x (moments2_max, amsgrad) or of 2.6."""
    args_3x = (params, grads, lr, m1, m2, None, pow1, pow2, None, None, beta1, beta2, eps, 1000,
               coeff, True, False, False, False)
    args_26 = args_3x[:5] + args_3x[6:-1]
    return _call_with_signature(_C_ops.fused_adam_, _FUSED_ADAM_SIGNATURE, args_3x, args_26)


def _call_with_signature(op, found, args_3x, args_26):
    """Call ``op`` with the argument list this Paddle takes, found on the first call (the
    argument parser refuses a wrong list before anything runs) and kept in ``found``."""
    if found:
        return op(*(args_3x if found[0] == "3x" else args_26))
    errors = []
    for name, args in (("3x", args_3x), ("26", args_26)):
        try:
            out = op(*args)
        except (ValueError, TypeError) as err:
            errors.append(err)
            continue
        found.append(name)
        return out
    raise errors[0]
