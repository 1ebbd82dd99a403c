"""Mixed precision, loss scaling and gradient clipping.

On a GPU, ``--amp`` runs the forward under ``paddle.amp.auto_cast`` level O1 in fp16 (the
seeds' setting) with LayerNorm, softmax and the losses kept in fp32, and the loss is scaled
by a dynamic loss scaler with the reference settings (start 65536, x2 after 2000 clean
steps, x0.5 and a skipped step on any inf/NaN gradient). Paddle's AMP does nothing on a CPU
(no fp16/bf16 training kernels there), so on a CPU ``--amp`` prints one notice and the run
is plain fp32 with no scaling.

The scaler is written here rather than taken from ``paddle.amp.GradScaler`` so that its
bookkeeping (skipped steps, growth, state saved in checkpoints) is the same code on every
device and is tested on CPU machines.
"""
import contextlib
import logging

import paddle

try:  # the multi-tensor operators are internal APIs; the loops below need none of them
    from paddle import _C_ops
except ImportError:  # pragma: no cover
    _C_ops = None

logger = logging.getLogger(__name__)

# ops kept in fp32 under O1 (Paddle's default lists already keep most reductions in fp32)
FP32_OPS = {"layer_norm", "softmax", "log_softmax", "softmax_with_cross_entropy",
            "cross_entropy", "cross_entropy_with_softmax", "mse_loss", "reduce_mean", "mean",
            "exp", "log", "pow", "sqrt", "rsqrt", "sum", "reduce_sum"}


def parse_amp_flag(value):
    """``--amp`` accepts fp16 / bf16 / off (and the booleans true/false for fp16/off)."""
    text = str(value).strip().lower()
    if text in ("", "none", "off", "false", "0", "no", "fp32"):
        return None
    if text in ("true", "1", "yes", "on", "fp16", "float16", "o1"):
        return "float16"
    if text in ("bf16", "bfloat16"):
        return "bfloat16"
    raise ValueError(f"--amp must be one of fp16, bf16, off; got {value!r}")


def amp_dtype_from_args(args):
    """The autocast dtype a parsed command line asks for: None with ``--amp false``, else
    ``--amp_dtype`` (float16 by default; bfloat16 trains without loss scaling)."""
    if not getattr(args, "amp", False):
        return None
    return parse_amp_flag(getattr(args, "amp_dtype", None) or "float16")


def on_gpu():
    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


class Precision:
    """Where autocast is really possible, wraps the forward in it; elsewhere a no-op."""

    def __init__(self, dtype=None, level="O1", device_has_amp=None):
        self.requested = dtype
        has_amp = on_gpu() if device_has_amp is None else device_has_amp
        self.dtype = dtype if has_amp else None
        self.level = level
        self.notice = None
        if dtype and not has_amp:
            self.notice = (f"--amp {dtype}: Paddle has no {dtype} training kernels on this "
                           "device (CPU); training runs in fp32.")

    @property
    def enabled(self):
        return self.dtype is not None

    @property
    def needs_loss_scaling(self):
        return self.dtype == "float16"

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(enable=True, level=self.level, dtype=self.dtype,
                                    custom_black_list=FP32_OPS)


def _tracer():
    try:
        from paddle.base.framework import _dygraph_tracer
    except ImportError:  # pragma: no cover - Paddle < 2.5
        from paddle.fluid.framework import _dygraph_tracer
    return _dygraph_tracer()


def amp_state():
    """(level, dtype) of the autocast in effect, e.g. ("O1", "float16"), or ("O0", "float32")
    outside autocast (read from the dygraph tracer; the same on Paddle 2.6 and 3.x)."""
    tracer = _tracer()
    if tracer is None:
        return "O0", "float32"
    level = str(getattr(tracer, "_amp_level", "O0")).rsplit(".", 1)[-1]
    return level, str(getattr(tracer, "_amp_dtype", "float32"))


class DynamicLossScaler:
    """Loss scaling with skip-on-overflow, as torch.cuda.amp.GradScaler / paddle's GradScaler
    with init_loss_scaling=65536, incr_every_n_steps=2000, decr_every_n_nan_or_inf=1."""

    def __init__(self, enabled=True, init_scale=65536.0, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000):
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0

    def scale_loss(self, loss):
        return loss * self.scale if self.enabled else loss

    def found_inf_and_unscale_(self, parameters):
        """Divide gradients by the scale in place; a bool tensor [1], True when any gradient
        is not finite (no host sync; on GPUs one multi-tensor call)."""
        grads = [p.grad for p in parameters if p.grad is not None]
        return found_inf_and_unscale_(grads, self.scale if self.enabled else 1.0)

    def update(self, found_inf):
        if found_inf:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            self.good_steps = 0
            if self.enabled:
                self.scale *= self.backoff_factor
            return
        self.consecutive_skips = 0
        if not self.enabled:
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self):
        return {"enabled": self.enabled, "scale": self.scale, "good_steps": self.good_steps,
                "skipped_steps": self.skipped_steps, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval}

    def load_state_dict(self, state):
        if not state:
            return
        if state.get("enabled", self.enabled) and self.enabled:
            self.scale = float(state["scale"])
            self.good_steps = int(state.get("good_steps", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))


class GradientOps:
    """The whole-gradient-list operations of a step, by their reference formulations: the
    hook a faster implementation replaces once per run (:func:`use_gradient_ops`). Each
    returns None / False where it does not apply and the reference code below then runs."""

    def takes(self, tensors):
        """True when these ops handle ``tensors`` (then no multi-tensor Paddle operator is
        used for them)."""
        return False

    def non_finite(self, tensors):
        """A bool tensor [1]: any inf/NaN in ``tensors``, from one call; or None."""
        return None

    def sums_of_squares(self, tensors):
        """[T] float32 ``(t * t).sum()`` of every tensor, from one call; or None."""
        return None

    def scale_all_(self, tensors, coef):
        """In place ``t *= coef`` for every tensor (coef a [1] tensor); False when not done."""
        return False


_gradient_ops = [GradientOps()]


def use_gradient_ops(ops=None):
    """Install ``ops`` (a :class:`GradientOps`; None: the reference) for the steps that follow;
    returns the previous one."""
    previous = _gradient_ops[0]
    _gradient_ops[0] = GradientOps() if ops is None else ops
    return previous


def gradient_ops():
    return _gradient_ops[0]


def _multi_tensor_path(tensors):
    """True where the per-tensor loops would each issue a kernel launch (the installed
    gradient ops do not take these tensors): then the one-call multi-tensor operators are
    used."""
    return _C_ops is not None and hasattr(_C_ops, "check_finite_and_unscale_") and \
        not _gradient_ops[0].takes(tensors)


def found_inf_and_unscale_(grads, scale=1.0):
    """One bool tensor [1]: True when any of ``grads`` holds an inf/NaN. When ``scale`` is not
    1, every gradient is divided by ``scale`` in place (a power of two, so the same numbers as
    multiplying by its inverse), whether or not all are finite: a step with a non-finite
    gradient is skipped and its gradients discarded. No host sync."""
    if not grads:
        return paddle.zeros([1], dtype="bool")
    if _multi_tensor_path(grads):
        flags = []
        for group in _by_dtype(grads):
            # a fill kernel with the value as attribute: no host-to-device copy
            scale_t = paddle.full([1], float(scale), dtype="float32")
            _, found = _C_ops.check_finite_and_unscale_(group, scale_t,
                                                        paddle.zeros([1], dtype="bool"))
            flags.append(found.reshape([1]))
        # the kernel also divides when a gradient is not finite; the step is skipped then
        return flags[0] if len(flags) == 1 else paddle.stack(flags).any().reshape([1])
    found = _gradient_ops[0].non_finite(grads)
    if found is None:
        flags = [paddle.isfinite(g).all() for g in grads]
        found = paddle.logical_not(paddle.stack(flags).all()).reshape([1])
    if scale != 1.0:
        # unscale unconditionally: a skipped step discards the gradients anyway
        inv = 1.0 / scale
        with paddle.no_grad():
            for g in grads:
                g.scale_(inv)
    return found


def _by_dtype(tensors):
    groups = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


def grad_norm_tensor(parameters):
    """The global L2 norm of the gradients of ``parameters`` as a 0-d float32 tensor (no host
    sync); 0 when none has a gradient."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return paddle.zeros([], dtype="float32")
    if _multi_tensor_path(grads):
        # one kernel per tensor (Paddle has no multi-tensor norm); each result has shape [1]
        squares = [_C_ops.squared_l2_norm(g if g.dtype == paddle.float32 else g.astype("float32"))
                   for g in grads]
        return paddle.sqrt(paddle.concat(squares).sum())
    # g * g, not g ** 2: the same float32 squares (pow(x, 2) is exact squaring) without
    # Paddle's slower CPU pow kernel (benchmarks/README.md)
    grads = [g if g.dtype == paddle.float32 else g.astype("float32") for g in grads]
    squares = _gradient_ops[0].sums_of_squares(grads)
    if squares is None:
        squares = paddle.stack([(g * g).sum() for g in grads])
    return paddle.sqrt(squares.sum())


def global_grad_norm(parameters):
    return float(grad_norm_tensor(parameters).item())


def clip_grads_(parameters, max_norm):
    """PyTorch's clip_grad_norm_ without a host sync: every gradient times
    min(max_norm / (norm + 1e-6), 1) (times 1.0 is exact). Returns the norm tensor."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = grad_norm_tensor(parameters)
    if max_norm is None or max_norm <= 0 or not parameters:
        return norm
    coef = paddle.clip(float(max_norm) / (norm + 1e-6), max=1.0)
    # a non-finite norm leaves the gradients alone (such a step is skipped anyway)
    coef = paddle.where(paddle.isfinite(norm), coef, paddle.ones_like(coef))
    grads = [p.grad for p in parameters]
    if _multi_tensor_path(grads) and all(g.dtype == paddle.float32 for g in grads):
        # one call for all: g / (1 / coef), within an ulp of g * coef (exact when coef is 1)
        _C_ops.check_finite_and_unscale_(grads, (1.0 / coef).reshape([1]),
                                         paddle.zeros([1], dtype="bool"))
        return norm
    with paddle.no_grad():
        if not _gradient_ops[0].scale_all_(grads, coef):
            for g in grads:
                g.multiply_(coef.astype(g.dtype))
    return norm


def clip_grad_norm_(parameters, max_norm):
    """PyTorch's clip_grad_norm_: scale all gradients by max_norm / (norm + 1e-6) when that
    is below 1. Returns the norm before clipping (a float)."""
    return float(clip_grads_(parameters, max_norm).item())
