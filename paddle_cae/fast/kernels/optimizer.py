"""Optimizer-step kernels (optimizer.cc), in place and without a backward: AdamW's update,
the loss scaler's non-finite check, gradient clipping's squared sums and scaling, the EMA
update. Every wrapper states its Reference: the Paddle operators it replaces; where the kernel
does not apply it returns False / None and the caller runs the reference."""
import math

from . import extension


def adamw_update_(param, grad, exp_avg, exp_avg_sq, lr, weight_decay, beta1, beta2, eps,
                  bias_correction1, bias_correction2, ext=None):
    """One in-place AdamW update in a single multi-threaded pass, when the kernels apply;
    returns False (and changes nothing) otherwise. Arithmetic of the plain path of
    :class:`paddle_cae.optim.AdamW`, every scalar rounded to float32 as Paddle's scalar ops do:
    ``p *= 1 - lr*wd; m += (1-b1)(g - m); v = v*b2 + g*g*(1-b2);
    p += m / (sqrt(v) / sqrt(bc2) + eps) * (-lr / bc1)``. ``ext``: the module chosen by
    :func:`kernels_for` (the caller guarantees float32 CPU tensors); else it is looked up."""
    if ext is None:
        ext = extension._use(param, grad, exp_avg, exp_avg_sq)
    if ext is None:
        return False
    ext.cae_adamw_update(param, grad, exp_avg, exp_avg_sq, 1.0 - lr * weight_decay, 1.0 - beta1,
                   beta2, 1.0 - beta2, math.sqrt(bias_correction2), eps,
                   -lr / bias_correction1, weight_decay != 0.0)
    return True



def non_finite(tensors, *, by_env=True):
    """A bool tensor [1]: True when any of ``tensors`` holds an inf or NaN, from one kernel
    call over all of them; None where the kernels do not apply (the caller then tests each
    tensor with Paddle's ops: ``logical_not(all(isfinite(t).all() for t)))``)."""
    ext = extension._use_all(tensors, by_env)
    if ext is None:
        return None
    return ext.cae_non_finite(list(tensors)) > 0.0


def sums_of_squares(tensors, *, by_env=True):
    """[T] float32: ``(t * t).sum()`` of every tensor, from one kernel call (the squares in
    float32 as the reference, each sum accumulated in double: within float32 rounding of
    Paddle's own float32 reduction, more accurate); None where the kernels do not apply.
    Reference: ``paddle.stack([(t * t).sum() for t in tensors])``."""
    ext = extension._use_all(tensors, by_env)
    if ext is None:
        return None
    return ext.cae_sums_of_squares(list(tensors))


def scale_all_(tensors, coef, *, by_env=True):
    """In place ``t *= coef`` for every tensor (``coef`` a float32 tensor of one element),
    from one kernel call; returns False (and changes nothing) where the kernels do not apply.
    Reference: ``t.multiply_(coef)`` for each."""
    ext = extension._use_all(list(tensors) + [coef], by_env)
    if ext is None:
        return False
    ext.cae_scale_all(list(tensors), coef.reshape([1]))
    return True


def ema_update_(ema, online, keep, take, *, by_env=True):
    """In place ``ema = ema * keep + online * take`` (float32 products, as Paddle computes
    that expression) in one multi-threaded pass, when the kernels apply; returns False (and
    changes nothing) otherwise."""
    ext = extension._use(ema, online, by_env=by_env)
    if ext is None or ema.numel() != online.numel() or not ema.is_contiguous() \
            or not online.is_contiguous():
        return False
    ext.cae_ema_update(ema, online, float(keep), float(take))
    return True
