"""The optimizer-step counterparts of the fast layers: AdamW's one-pass update, the one-call
non-finite check, gradient norm and scaling of the loss scaler and gradient clipping, and the
EMA update. Each computes what the reference code of paddle_cae/optim, runtime/amp and
models/common computes (see the kernels' "Reference" in
:mod:`paddle_cae.fast.kernels.optimizer`), and hands back to it wherever the kernels do not
apply.

:func:`accelerate_optimizer` applies them once, where a run is built.
"""
import paddle

from ..models import common
from ..optim.adamw import AdamW
from ..runtime import amp
from .kernels import extension, optimizer as optimizer_ops
from . import switches

__all__ = ["FastAdamW", "FastGradientOps", "accelerate_optimizer", "accelerate_steps",
           "fast_ema_update_"]


class FastAdamW(AdamW):
    """AdamW whose per-parameter update of float32 CPU parameters is one multi-threaded pass
    (:func:`paddle_cae.fast.kernels.optimizer.adamw_update_`, the same float32 arithmetic;
    the parameters within the last bit, as its sqrt is correctly rounded). ``_kernel``: the
    extension module, chosen once by :func:`accelerate_optimizer`."""

    _kernel = None
    state_name = "AdamW"  # the same state: a run resumes with either class

    def _multi_tensor_for(self, param):
        if self.multi_tensor is None and param.place.is_cpu_place():
            return False  # one kernel pass per parameter beats Paddle's multi-tensor op here
        return AdamW._multi_tensor_for(self, param)

    def _apply(self, param, grad, exp_avg, exp_avg_sq, lr, wd, eps, beta1, beta2,
               bias_correction1, bias_correction2):
        if param.dtype == paddle.float32 and grad.dtype == paddle.float32 and \
                param.place.is_cpu_place():
            optimizer_ops.adamw_update_(param, grad, exp_avg, exp_avg_sq, lr, wd, beta1, beta2, eps,
                                    bias_correction1, bias_correction2, ext=self._kernel)
            return
        AdamW._apply(self, param, grad, exp_avg, exp_avg_sq, lr, wd, eps, beta1, beta2,
                     bias_correction1, bias_correction2)


class FastGradientOps(amp.GradientOps):
    """The loss scaler's non-finite check and gradient clipping's norm and scaling over all
    gradients in one kernel call each, for float32 CPU gradients."""

    def takes(self, tensors):
        return extension._use(tensors[0], by_env=False) is not None

    def non_finite(self, tensors):
        return optimizer_ops.non_finite(tensors, by_env=False)

    def sums_of_squares(self, tensors):
        return optimizer_ops.sums_of_squares(tensors, by_env=False)

    def scale_all_(self, tensors, coef):
        return optimizer_ops.scale_all_(tensors, coef, by_env=False)


def fast_ema_update_(ema, online, keep, take):
    """The EMA update of one tensor in one multi-threaded pass (bit-identical to the
    reference); False where the kernel does not apply."""
    return optimizer_ops.ema_update_(ema, online, keep, take, by_env=False)


def accelerate_steps(environ=None):
    """Install, for the steps that follow, the gradient-list kernels (loss scaler, clipping)
    and the EMA kernel with ``PADDLE_CAE_FUSED_OPS`` on, the reference operations with it off
    (read once, here). Returns whether the kernels were installed."""
    on = switches.fused_ops(environ)
    amp.use_gradient_ops(FastGradientOps() if on else None)
    common.use_ema_tensor_update(fast_ema_update_ if on else None)
    return on


def accelerate_optimizer(optimizer, environ=None):
    """:func:`accelerate_steps`, and with the switch on an :class:`~paddle_cae.optim.AdamW`
    (not ``fused=True``) whose first float32 parameter the kernels take becomes a
    :class:`FastAdamW` (same state). Returns ``optimizer``."""
    if not accelerate_steps(environ):
        return optimizer
    if type(optimizer) is AdamW and not optimizer.fused:
        first = next((p for g in optimizer.param_groups for p in g["params"]
                      if p.dtype == paddle.float32), None)
        kernel = None if first is None else extension.kernels_for(first, by_env=False)
        if kernel is not None:
            optimizer.__class__ = FastAdamW
            optimizer._kernel = kernel
    return optimizer
