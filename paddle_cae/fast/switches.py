"""Every ``PADDLE_CAE_*`` environment switch of the package, read here and nowhere else.

* ``PADDLE_CAE_FUSED_OPS`` (on): ``0`` keeps the reference layers and optimizer steps (the
  operators a GPU runs): ``accelerate`` and ``accelerate_optimizer`` change nothing.
* ``PADDLE_CAE_MALLOC_TUNING`` (on): ``0`` leaves glibc's malloc alone when the kernels load
  (:func:`paddle_cae.fast.kernels.extension.tune_allocator`).
* ``PADDLE_CAE_OPS_DIR`` (``~/.cache/paddle_cae/ops``): where native code is compiled to.
* ``PADDLE_CAE_FAST_RESIZE`` (on): ``0``: the loader crops and resizes with PIL.
* ``PADDLE_CAE_RESAMPLE_ISA`` (the best the CPU has): a lesser vector code path for the
  resampler (avx512, avx2, generic; tests of every path).
* ``PADDLE_CAE_ATTENTION`` (sdpa): ``explicit``: attention formed step by step in the
  reference order; set on the model's attention layers by ``accelerate``.
* ``PADDLE_CAE_INFER_BF16`` (auto): ``0``: the exported-model predictor stays in fp32 (its
  callers pass :func:`infer_bf16` on as ``auto_bf16``).
* ``PADDLE_CAE_BENCH_TOTAL_THREADS`` (unset): the threads benchmarks/throughput.py shares
  among its processes.

Each is read where a run, a model or a native library is built (once per build), not on every
step; the functions take the environment as an argument so that callers can pass their own.
"""
import os

_OFF = ("0", "false", "no", "off")


def _text(name, environ=None):
    return (os.environ if environ is None else environ).get(name, "").strip()


def _on(name, environ=None):
    """A switch that is on unless set to 0 / false / no / off."""
    return _text(name, environ).lower() not in _OFF


def fused_ops(environ=None):
    """True unless ``PADDLE_CAE_FUSED_OPS`` switches the fused CPU kernels off."""
    return _on("PADDLE_CAE_FUSED_OPS", environ)


def malloc_tuning(environ=None):
    return _on("PADDLE_CAE_MALLOC_TUNING", environ)


def fast_resize(environ=None):
    return _on("PADDLE_CAE_FAST_RESIZE", environ)


def resample_isa(environ=None):
    """The vector code path asked for the resampler ('' for the best one the CPU has)."""
    return _text("PADDLE_CAE_RESAMPLE_ISA", environ).lower()


def ops_dir(environ=None):
    """The folder native code is compiled into."""
    return _text("PADDLE_CAE_OPS_DIR", environ) or os.path.join(
        os.path.expanduser("~"), ".cache", "paddle_cae", "ops")


def explicit_attention(environ=None):
    """True when ``PADDLE_CAE_ATTENTION=explicit`` asks for step-by-step attention."""
    return _text("PADDLE_CAE_ATTENTION", environ).lower() == "explicit"


def attention_mode(environ=None):
    return _text("PADDLE_CAE_ATTENTION", environ) or "default"


def infer_bf16(environ=None):
    """False when ``PADDLE_CAE_INFER_BF16`` turns automatic bf16 inference off."""
    return _on("PADDLE_CAE_INFER_BF16", environ)


def bench_total_threads(environ=None):
    """``PADDLE_CAE_BENCH_TOTAL_THREADS``: the threads benchmarks/throughput.py shares among
    its processes (0: not set)."""
    return int(_text("PADDLE_CAE_BENCH_TOTAL_THREADS", environ) or 0)


def snapshot(environ=None):
    """name -> value of every switch (for reports and benchmark records)."""
    return {"fused_ops": fused_ops(environ), "malloc_tuning": malloc_tuning(environ),
            "ops_dir": ops_dir(environ), "fast_resize": fast_resize(environ),
            "resample_isa": resample_isa(environ) or "best",
            "attention": attention_mode(environ), "infer_bf16": infer_bf16(environ)}
