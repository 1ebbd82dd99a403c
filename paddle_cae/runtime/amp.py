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
import math

import paddle

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

    def unscale_(self, parameters):
        """Divide gradients by the scale; return True when all of them are finite."""
        grads = [p.grad for p in parameters if p.grad is not None]
        finite = grads_are_finite(grads)
        if self.enabled and finite and self.scale != 1.0:
            inv = 1.0 / self.scale
            with paddle.no_grad():
                for g in grads:
                    g.scale_(inv)
        return finite

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


def grads_are_finite(grads):
    if not grads:
        return True
    flags = [paddle.isfinite(g).all() for g in grads]
    return bool(paddle.stack(flags).all().item())


def global_grad_norm(parameters):
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    # g * g, not g ** 2: the same float32 squares (pow(x, 2) is exact squaring), but Paddle's
    # CPU pow kernel is ~10x slower (it was 15% of a ViT-B training step)
    squares = []
    for g in grads:
        g = g.astype("float32")
        squares.append((g * g).sum())
    sq = paddle.stack(squares).sum()
    return float(paddle.sqrt(sq).item())


def clip_grad_norm_(parameters, max_norm):
    """PyTorch's clip_grad_norm_: scale all gradients by max_norm / (norm + 1e-6) when that
    is below 1. Returns the norm before clipping."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = global_grad_norm(parameters)
    if max_norm is not None and max_norm > 0 and math.isfinite(norm):
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            with paddle.no_grad():
                for p in parameters:
                    p.grad.scale_(coef)
    return norm
