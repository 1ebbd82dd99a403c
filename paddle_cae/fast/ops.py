"""Fused CPU kernels for the transformer block (and a few frozen-model and optimizer updates),
built as a Paddle custom-operator extension (``vit_kernels.cc``) on first use.

Paddle's CPU elementwise kernels (bias adds and their gradient reductions, GELU, LayerNorm,
softmax, the head transposes of attention) run on one thread and make several passes over
memory; the matrix products are multi-threaded. These kernels compute what the Paddle operators
they replace compute (every function here states its reference formulation, which is also its
fallback), fused into one multi-threaded (OpenMP), vectorized pass each. The bias, residual,
head-layout and EMA kernels give the reference's float32 values (their gradient reductions
accumulate in double, as do LayerNorm's statistics); AdamW's parameters are within the last bit
(its sqrt is correctly rounded, Paddle's is not); softmax and GELU use the kernels' own
vectorizable exp and normal CDF (softmax within 6 ulp, the CDF within 1.5e-7 of double
precision; tests/test_fused_ops.py).

They are used only where they apply: dynamic graph, float32 tensors on the CPU, and the
extension built (the no-backward ops also only where no input needs a gradient). Everywhere
else (GPU, AMP, ``paddle.jit.to_static`` / export, no C++ compiler, ``PADDLE_CAE_FUSED_OPS=0``)
the same functions run the pure-Paddle reference.

The extension is compiled with the system C++ compiler, for the CPU's vector instructions
(AVX-512 / AVX2 / generic), into ``$PADDLE_CAE_OPS_DIR`` (default ``~/.cache/paddle_cae/ops``;
one folder per Paddle version, source, flags and instruction set) the first time it is needed
(about 30 s) and loaded from there afterwards; concurrent first uses wait on a file lock.
"""
import ctypes
import logging
import math
import os
import warnings

from ..startup import quiet_paddle_import_warnings

# paddle.utils.cpp_extension warns "No ccache found" when it is first imported (Paddle's own
# import already does): nothing a user of this package can act on
quiet_paddle_import_warnings()

import paddle  # noqa: E402
import paddle.nn.functional as F

from . import native, switches

logger = logging.getLogger("paddle_cae")

_SOURCES = [native.source_path("vit_kernels.cc")]
_NAME = "paddle_cae_vit_kernels"


def enabled_by_env():
    """The ``PADDLE_CAE_FUSED_OPS`` switch (on unless 0 / false / no / off): read by
    :func:`paddle_cae.fast.accelerate` when a run is built; the functions here read it on each
    call unless the caller passes ``by_env=False`` (the accelerated layers and steps do)."""
    return switches.fused_ops()


# instruction sets the kernels are compiled for, best first: (name, /proc/cpuinfo flags, gcc flags)
_ISAS = (
    ("avx512", ("avx512f", "avx512dq", "avx512bw", "avx512vl", "avx2", "fma"),
     ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"]),
    ("avx2", ("avx2", "fma"), ["-mavx2", "-mfma"]),
)


def isa_target(cpuinfo="/proc/cpuinfo"):
    """(name, compiler flags) of the best vector instruction set this CPU has ('generic', []
    when none is known, or off x86)."""
    return native.best_isa(_ISAS, cpuinfo=cpuinfo)


def _cxx_flags():
    # -ffp-contract=off: no fused multiply-adds, a * b + c rounds twice as in the Paddle ops;
    # -fno-trapping-math: both sides of a select may be computed, so the math vectorizes;
    # -fno-math-errno: sqrt need not set errno, so it vectorizes (same correctly rounded result)
    return ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off"] + \
        isa_target()[1]


def _openmp_ldflags():
    """Link the kernels' OpenMP to the runtime MKL uses in this Paddle wheel (Intel's
    libiomp5 in paddle/libs, which also serves GCC's GOMP entry points) when it ships one;
    otherwise GCC's libgomp. With two OpenMP runtimes in the process, each keeps its own
    threads: MKL's spin after every matmul while the kernels' threads want the same cores."""
    libs = os.path.join(os.path.dirname(paddle.__file__), "libs")
    if os.path.isfile(os.path.join(libs, "libiomp5.so")):
        return [f"-L{libs}", "-liomp5", f"-Wl,-rpath,{libs}"]
    return ["-fopenmp"]


def _ldflags():
    return _openmp_ldflags() + ["-ldl"]


def _build_dir():
    """Keyed by Paddle's version, the sources and the compiler and linker flags (incl. the
    ISA and the OpenMP runtime)."""
    return native.build_dir(f"paddle{paddle.__version__}", _SOURCES, _cxx_flags() + _ldflags(),
                            isa_target()[0])


def _build_and_import():
    build_dir = _build_dir()
    lib_dir = os.path.join(build_dir, _NAME)
    native.build_once(build_dir, os.path.join(lib_dir, _NAME + ".so"),
                      lambda: _quiet_paddle_build(build_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from paddle.utils.cpp_extension import extension_utils
    # import the library directly; paddle's load() would start a setup.py each time
    module = extension_utils._import_module_from_library(_NAME, lib_dir, False)
    tune_allocator()
    return module


_NATIVE = native.NativeLibrary("fused CPU kernels", _build_and_import,
                               fallback="using the Paddle reference ops")


def _load():
    """The compiled extension module, or None when it cannot be built here."""
    return _NATIVE.get()


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_allocator_tuned = []


def tune_allocator():
    """Keep freed tensor memory in the process's heap for the next tensor (glibc malloc).

    Paddle's CPU allocator takes every tensor from malloc and gives it back when the tensor
    dies. glibc serves blocks above 128 KiB-32 MiB (a training step's activations and
    gradients) by mmap and returns them to the system on free, so the next tensor's first
    write page-faults every 4 KiB page again: an elementwise op on a 3 MB tensor took 1.5 ms
    instead of 0.08. Here malloc is told never to mmap (``M_MMAP_MAX`` 0) and to return heap
    memory only beyond 1 GiB of free space at its top (``M_TRIM_THRESHOLD``): the same
    arithmetic, the pages stay mapped. Called when the fused kernels are loaded (the CPU fast
    variant); ``PADDLE_CAE_MALLOC_TUNING=0`` leaves malloc alone. Returns True when applied
    (False off glibc, or when switched off)."""
    if _allocator_tuned:
        return _allocator_tuned[0]
    applied = False
    if switches.malloc_tuning():
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):  # not glibc (or no libc symbols in the process)
            mallopt = None
        if mallopt is not None:
            applied = bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30)) and bool(mallopt(_M_MMAP_MAX, 0))
    _allocator_tuned.append(applied)
    return applied


def _quiet_paddle_build(build_dir):
    """Paddle's builder logs at INFO and warns about ccache on every call: keep the package's
    output clean (a failed build still raises)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from paddle.utils.cpp_extension import extension_utils, load

    paddle_logger = getattr(extension_utils, "logger", None)
    level = paddle_logger.level if paddle_logger is not None else None
    if paddle_logger is not None:
        paddle_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load(name=_NAME, sources=_SOURCES, extra_cxx_cflags=_cxx_flags(),
                 extra_ldflags=_ldflags(), build_directory=build_dir, verbose=False)
    finally:
        if paddle_logger is not None:
            paddle_logger.setLevel(level)


def extension_available():
    return enabled_by_env() and _load() is not None


@paddle.jit.not_to_static
def _use(*tensors, by_env=True):
    """The extension where it applies: dynamic graph, float32 CPU tensors, built, and enabled
    by the environment switch (not read when ``by_env`` is False: the model layers that call
    with it were chosen by the switch when they were built, paddle_cae/models/fused.py)."""
    if by_env and not enabled_by_env():
        return None
    if not paddle.in_dynamic_mode():
        return None
    for t in tensors:
        if t is None or t.dtype != paddle.float32 or not t.place.is_cpu_place():
            return None
    return _load()


@paddle.jit.not_to_static
def usable(x):
    """True when the fused kernels would run for tensors like ``x`` (the model layers pick
    their fused formulation only then, and keep Paddle's own elsewhere)."""
    return _use(x) is not None


@paddle.jit.not_to_static
def applies(x):
    """:func:`usable` without reading the environment switch: for layers built with the
    kernels (the switch was read then)."""
    return _use(x, by_env=False) is not None


# --------------------------------------------------------------------------- the ops
# ``by_env=False``: the caller was built with the kernels, the switch is not read again
def split_heads(qkv, bias, num_heads, q_scale=1.0, *, by_env=True):
    """qkv [B, N, 3*C] (the projection without its bias), bias [3*C] -> q, k, v [B, h, N, d].

    Reference: ``t = qkv + bias``; split in three along the last axis; each [B, N, h, d]
    transposed to [B, h, N, d]; ``q = q * q_scale`` (skipped when q_scale is 1)."""
    ext = _use(qkv, bias, by_env=by_env)
    if ext is not None:
        q, k, v = ext.cae_split_heads(qkv, bias, int(num_heads), float(q_scale))
        return q, k, v
    b, n, c3 = qkv.shape
    t = (qkv + bias).reshape([b, n, 3, num_heads, c3 // 3 // num_heads])
    q, k, v = (x.transpose([0, 2, 1, 3]) for x in t.unbind(2))
    if q_scale != 1.0:
        q = q * q_scale
    return q, k, v


def merge_heads(x, *, by_env=True):
    """[B, h, N, d] -> [B, N, h*d]. Reference: transpose then reshape."""
    ext = _use(x, by_env=by_env)
    if ext is not None:
        return ext.cae_merge_heads(x)
    b, h, n, d = x.shape
    return x.transpose([0, 2, 1, 3]).reshape([b, n, h * d])


def scaled_softmax(x, scale=1.0, bias=None, *, by_env=True):
    """softmax(x * scale [+ bias]) over the last axis; x [B, h, R, L], bias [h, R, L] or None.
    Reference: ``x * scale`` (skipped when scale is 1), ``+ bias``, ``F.softmax``."""
    ext = _use(x, bias, by_env=by_env) if bias is not None else _use(x, by_env=by_env)
    if ext is not None and x.ndim == 4:
        if bias is None:
            return ext.cae_scaled_softmax(x, float(scale))
        if list(bias.shape) == list(x.shape[1:]):
            return ext.cae_scaled_softmax_bias(x, bias, float(scale))
    if scale != 1.0:
        x = x * scale
    if bias is not None:
        x = x + bias
    return F.softmax(x, axis=-1)


_gemm = []


def _has_gemm(ext, like):
    """Whether the kernels found MKL's sgemm (the Paddle CPU wheel's libmklml_intel.so)."""
    if not _gemm:
        _gemm.append(bool(ext.cae_gemm_available(like).numpy()[0] == 1.0))
    return _gemm[0]


def attention(q, k, v, scale=1.0, *, by_env=True):
    """softmax(q k^T * scale) v with the heads merged: q, k, v [B, h, N, d] -> [B, N, h*d].

    Reference: ``merge_heads(paddle.matmul(scaled_softmax(paddle.matmul(q, k,
    transpose_y=True), scale), v))``. The kernel forms each (batch, head) pair's two products
    with MKL's sgemm, one pair per thread; the softmax is the same kernel code."""
    ext = _use(q, k, v, by_env=by_env)
    if ext is not None and q.ndim == 4 and _has_gemm(ext, q):
        out, _ = ext.cae_attention(q, k, v, float(scale))
        return out
    scores = scaled_softmax(paddle.matmul(q, k, transpose_y=True), scale, by_env=by_env)
    return merge_heads(paddle.matmul(scores, v), by_env=by_env)


def heads(x, num_heads, *, by_env=True):
    """[B, N, h*d] -> [B, h, N, d]. Reference: reshape to [B, N, h, d], transpose to
    [B, h, N, d]."""
    ext = _use(x, by_env=by_env)
    if ext is not None and x.ndim == 3:
        return ext.cae_heads(x, int(num_heads))
    b, n, c = x.shape
    return x.reshape([b, n, num_heads, c // num_heads]).transpose([0, 2, 1, 3])


def linear(x, weight, bias=None, *, by_env=True):
    """``F.linear(x, weight, bias)`` (weight [in, out]); on the kernels ``x @ weight`` then
    the bias-add kernel, whose backward sums the bias gradient on all threads. Reference (also
    without a bias, and where the product is not float32): ``F.linear``."""
    if bias is not None and _use(x, weight, bias, by_env=by_env) is not None:
        y = paddle.matmul(x, weight)
        ext = _use(y, bias, by_env=by_env)  # (not float32 under an autocast)
        if ext is not None:
            return ext.cae_bias_add(y, bias)
    return F.linear(x, weight, bias)


def bias_gelu(h, bias, *, by_env=True):
    """gelu(h + bias), exact erf form. Reference: ``F.gelu(h + bias)``."""
    ext = _use(h, bias, by_env=by_env)
    if ext is not None:
        return ext.cae_bias_gelu(h, bias)
    return F.gelu(h + bias)


def residual_bias(res, h, bias, gamma=None, *, by_env=True):
    """``res + (h + bias)``, or ``res + gamma * (h + bias)`` with a layer-scale gamma."""
    ext = _use(res, h, bias, by_env=by_env) if gamma is None else \
        _use(res, h, bias, gamma, by_env=by_env)
    if ext is not None and list(res.shape) == list(h.shape):
        if gamma is None:
            return ext.cae_residual_bias(res, h, bias)
        return ext.cae_residual_scale_bias(res, h, bias, gamma)
    y = h + bias
    return res + (y if gamma is None else gamma * y)


_true_division = []


def _scalar_division_is_true_division():
    """Whether this Paddle computes ``tensor / python_float`` as a float32 division (3.x) or
    as a multiplication by the float32 reciprocal (2.6): decided once, by computing it."""
    if not _true_division:
        import numpy as np

        values = np.random.default_rng(0).standard_normal(4096).astype("float32")
        got = (paddle.to_tensor(values) / 0.9).numpy()
        _true_division.append(bool(np.array_equal(got, values / np.float32(0.9))))
    return _true_division[0]


def residual_drop_path(res, h, bias, gamma, mask, keep, *, by_env=True):
    """``res + drop_path(h + bias)`` (``gamma * (h + bias)`` with a layer scale) for a drawn
    per-sample ``mask`` [B, 1, ...] of 0 / 1 and keep probability ``keep``.

    Reference: ``y = h + bias; y = gamma * y; res + y / keep * mask``, the DropPath formula
    (models/layers.py)."""
    ext = _use(res, h, bias, mask, by_env=by_env) if gamma is None else \
        _use(res, h, bias, gamma, mask, by_env=by_env)
    if ext is not None and list(res.shape) == list(h.shape) and \
            int(mask.numel()) == int(h.shape[0]):
        args = (float(keep), float(1.0 / keep), _scalar_division_is_true_division())
        flat = mask.reshape([-1])
        if gamma is None:
            return ext.cae_residual_drop(res, h, bias, flat, *args)
        return ext.cae_residual_scale_drop(res, h, bias, gamma, flat, *args)
    y = h + bias
    y = y if gamma is None else gamma * y
    return res + y / keep * mask


def layer_norm(x, weight, bias, eps, *, by_env=True):
    """LayerNorm over the last axis. Reference: ``F.layer_norm``."""
    ext = _use(x, weight, bias, by_env=by_env)
    if ext is not None:
        y, _, _ = ext.cae_layer_norm(x, weight, bias, float(eps))
        return y
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def _no_grad_use(*tensors, by_env=True):
    """The extension, for ops without a backward: only when no input needs a gradient."""
    if any(not t.stop_gradient for t in tensors) and paddle.is_grad_enabled():
        return None
    return _use(*tensors, by_env=by_env)


def channel_bias(x, bias, *, by_env=True):
    """NCHW ``x + bias[c]`` (a convolution's bias). Reference: ``x + bias.reshape([1, C, 1, 1])``,
    the add ``F.conv2d`` does itself. Fused only where nothing needs a gradient (the frozen
    tokenizer)."""
    ext = _no_grad_use(x, bias, by_env=by_env)
    if ext is not None and x.ndim == 4:
        return ext.cae_channel_bias(x, bias)
    return x + bias.reshape([1, -1] + [1] * (x.ndim - 2))


def add_scaled(a, b, gain, *, by_env=True):
    """``a + gain * b``. Reference: exactly that. Fused only where nothing needs a gradient."""
    ext = _no_grad_use(a, b, by_env=by_env)
    if ext is not None and list(a.shape) == list(b.shape):
        return ext.cae_add_scaled(a, b, float(gain))
    return a + gain * b


def kernels_for(tensor, *, by_env=True):
    """The kernel module for tensors like ``tensor`` (float32, CPU, dynamic graph, switch on,
    built), or None: for callers that choose their path once (the optimizer, by
    :func:`paddle_cae.fast.accelerate_optimizer`) and pass it back as ``ext``."""
    return _use(tensor, by_env=by_env)


def adamw_update_(param, grad, exp_avg, exp_avg_sq, lr, weight_decay, beta1, beta2, eps,
                  bias_correction1, bias_correction2, ext=None):
    """One in-place AdamW update in a single multi-threaded pass, when the kernels apply;
    returns False (and changes nothing) otherwise. Arithmetic of the plain path of
    :class:`paddle_cae.optim.AdamW`, every scalar rounded to float32 as Paddle's scalar ops do:
    ``p *= 1 - lr*wd; m += (1-b1)(g - m); v = v*b2 + g*g*(1-b2);
    p += m / (sqrt(v) / sqrt(bc2) + eps) * (-lr / bc1)``. ``ext``: the module chosen by
    :func:`kernels_for` (the caller guarantees float32 CPU tensors); else it is looked up."""
    if ext is None:
        ext = _use(param, grad, exp_avg, exp_avg_sq)
    if ext is None:
        return False
    ext.cae_adamw_update(param, grad, exp_avg, exp_avg_sq, 1.0 - lr * weight_decay, 1.0 - beta1,
                   beta2, 1.0 - beta2, math.sqrt(bias_correction2), eps,
                   -lr / bias_correction1, weight_decay != 0.0)
    return True


def _use_all(tensors, by_env=True):
    """The extension for a list of whole tensors (one call over all of them), or None."""
    if not tensors or any(not t.is_contiguous() for t in tensors):
        return None
    return _use(*tensors, by_env=by_env)


def non_finite(tensors, *, by_env=True):
    """A bool tensor [1]: True when any of ``tensors`` holds an inf or NaN, from one kernel
    call over all of them; None where the kernels do not apply (the caller then tests each
    tensor with Paddle's ops: ``logical_not(all(isfinite(t).all() for t)))``)."""
    ext = _use_all(tensors, by_env)
    if ext is None:
        return None
    return ext.cae_non_finite(list(tensors)) > 0.0


def sums_of_squares(tensors, *, by_env=True):
    """[T] float32: ``(t * t).sum()`` of every tensor, from one kernel call (the squares in
    float32 as the reference, each sum accumulated in double: within float32 rounding of
    Paddle's own float32 reduction, more accurate); None where the kernels do not apply.
    Reference: ``paddle.stack([(t * t).sum() for t in tensors])``."""
    ext = _use_all(tensors, by_env)
    if ext is None:
        return None
    return ext.cae_sums_of_squares(list(tensors))


def scale_all_(tensors, coef, *, by_env=True):
    """In place ``t *= coef`` for every tensor (``coef`` a float32 tensor of one element),
    from one kernel call; returns False (and changes nothing) where the kernels do not apply.
    Reference: ``t.multiply_(coef)`` for each."""
    ext = _use_all(list(tensors) + [coef], by_env)
    if ext is None:
        return False
    ext.cae_scale_all(list(tensors), coef.reshape([1]))
    return True


def ema_update_(ema, online, keep, take, *, by_env=True):
    """In place ``ema = ema * keep + online * take`` (float32 products, as Paddle computes
    that expression) in one multi-threaded pass, when the kernels apply; returns False (and
    changes nothing) otherwise."""
    ext = _use(ema, online, by_env=by_env)
    if ext is None or ema.numel() != online.numel() or not ema.is_contiguous() \
            or not online.is_contiguous():
        return False
    ext.cae_ema_update(ema, online, float(keep), float(take))
    return True


# ----------------------------------------------------- frozen convolutional tokenizer
# Activations in the channel-major layout [C, B, H, W] (the kernels' im2col tiles gather from
# it); see vit_kernels.cc. Only where nothing needs a gradient and MKL's sgemm was found.
_TOKENIZER_EPILOGUES = {"bias": 0, "relu": 1, "residual": 2}


def tokenizer_kernels(x):
    """The kernel module when the tokenizer kernels apply to images like ``x`` (float32 CPU,
    dynamic graph, built, MKL found, no gradient wanted), else None. The environment switch
    is not read: the tokenizer chose its variant when it was built."""
    ext = _no_grad_use(x, by_env=False)
    return ext if ext is not None and _has_gemm(ext, x) else None


def tokenizer_conv(ext, x, weight, bias, *, nchw=False, relu_in=False, epilogue="bias",
                   residual=None, gain=1.0):
    """A 'same'-padded, stride-1 convolution with the [O, C, k, k] ``weight`` (odd k) of
    ``x`` ([B, C, H, W] when ``nchw``, else [C, B, H, W]) into [O, B, H, W].

    Reference, in NCHW: ``t = F.conv2d(relu(x) if relu_in else x, weight, padding=(k-1)//2)
    + bias[c]``, then ``t`` ('bias'), ``relu(t)`` ('relu') or ``residual + gain * t``
    ('residual')."""
    res = residual if residual is not None else bias
    return ext.cae_tokenizer_conv(x, weight, bias, res, bool(nchw), bool(relu_in),
                                  _TOKENIZER_EPILOGUES[epilogue], float(gain))


def tokenizer_argmax(ext, x, weight, bias):
    """Token ids int64 [B, H*W] of x [C, B, H, W]: reference ``paddle.argmax(F.conv2d(relu(x),
    weight) + bias[c], axis=1)`` for 1x1 ``weight`` [V, C, 1, 1], flattened row-major."""
    return ext.cae_tokenizer_argmax(x, weight, bias)


def tokenizer_pool(ext, x):
    """2x2 max-pool with stride 2 of x [C, B, H, W]. Reference: ``F.max_pool2d(x, 2)`` per
    channel plane."""
    return ext.cae_tokenizer_pool(x)
