"""The kernel extension: the three kernel files of this folder (block.cc, optimizer.cc,
tokenizer.cc, with common.h) built as one Paddle custom-operator extension on first use, and
the test every wrapper makes before it calls a kernel (:func:`_use`).

The kernels are used only where they apply: dynamic graph, float32 tensors on the CPU, and the
extension built (the no-backward ops also only where no input needs a gradient). Everywhere
else (GPU, AMP, ``paddle.jit.to_static`` / export, no C++ compiler) the wrappers compute the
pure-Paddle reference. Called directly, a wrapper also reads ``PADDLE_CAE_FUSED_OPS``
(``by_env=True``); the fast layers and steps pass ``by_env=False`` (the switch was read when
they were swapped in).

The extension is compiled with the system C++ compiler, for the CPU's vector instructions
(AVX-512 / AVX2 / generic), by :mod:`paddle_cae.fast.native` into ``$PADDLE_CAE_OPS_DIR``
(one folder per Paddle version, sources, flags and instruction set) the first time it is
needed, and loaded from there afterwards.
"""
import contextlib
import ctypes
import logging
import math
import os
import warnings

from ...startup import quiet_paddle_import_warnings

# paddle.utils.cpp_extension warns "No ccache found" when it is first imported (Paddle's own
# import already does): nothing a user of this package can act on
quiet_paddle_import_warnings()

import paddle  # noqa: E402
import paddle.nn.functional as F

from .. import native, switches

logger = logging.getLogger("paddle_cae")

_SOURCES = [native.source_path(os.path.join("kernels", name))
            for name in ("block.cc", "optimizer.cc", "tokenizer.cc")]
_HEADERS = [native.source_path(os.path.join("kernels", "common.h"))]
_NAME = "paddle_cae_kernels"


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
    return native.build_dir(f"paddle{paddle.__version__}", _SOURCES + _HEADERS,
                            _cxx_flags() + _ldflags(),
                            isa_target()[0])


def _build_and_import():
    build_dir = _build_dir()
    lib_dir = os.path.join(build_dir, _NAME)
    built = []  # load()'s module when it builds (importing it again registers the ops twice)
    with _quiet_paddle_builder() as (extension_utils, load):
        native.build_once(build_dir, os.path.join(lib_dir, _NAME + ".so"), lambda: built.append(
            load(name=_NAME, sources=_SOURCES, extra_cxx_cflags=_cxx_flags(),
                 extra_ldflags=_ldflags(), build_directory=build_dir, verbose=False)))
        # built before: import the library directly (paddle's load() would start a setup.py)
        module = built[0] if built else \
            extension_utils._import_module_from_library(_NAME, lib_dir, False)
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
    write page-faults every 4 KiB page again. Here malloc is told never to mmap
    (``M_MMAP_MAX`` 0) and to return heap memory only beyond 1 GiB of free space at its top
    (``M_TRIM_THRESHOLD``): the same arithmetic, the pages stay mapped. Called when the fused
    kernels are loaded; ``PADDLE_CAE_MALLOC_TUNING=0`` leaves malloc alone. Returns True when applied
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


@contextlib.contextmanager
def _quiet_paddle_builder():
    """(extension_utils, load) of Paddle's builder, which logs at INFO and warns about ccache
    on every call: the package's output stays clean (a failed build still raises)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from paddle.utils.cpp_extension import extension_utils, load

        paddle_logger = getattr(extension_utils, "logger", None)
        level = paddle_logger.level if paddle_logger is not None else None
        if paddle_logger is not None:
            paddle_logger.setLevel(logging.WARNING)
        try:
            yield extension_utils, load
        finally:
            if paddle_logger is not None:
                paddle_logger.setLevel(level)


def extension_available():
    return enabled_by_env() and _load() is not None


@paddle.jit.not_to_static
def _use(*tensors, by_env=True):
    """The extension where it applies: dynamic graph, float32 CPU tensors, built, and enabled
    by the environment switch (not read when ``by_env`` is False: the fast layers and steps
    that call with it were swapped in by ``accelerate``, which read the switch then)."""
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
    """True when the fused kernels would run for tensors like ``x`` (switch read now)."""
    return _use(x) is not None


@paddle.jit.not_to_static
def applies_without_gradient(*tensors):
    """:func:`applies` for the ops without a backward: also no input needs a gradient."""
    return _no_grad_use(*tensors, by_env=False) is not None


@paddle.jit.not_to_static
def applies(x):
    """:func:`usable` without reading the environment switch: the one question a fast layer
    asks of its input (the switch was read when it was swapped in)."""
    return _use(x, by_env=False) is not None

_gemm = []


def _has_gemm(ext, like):
    """Whether the kernels found MKL's sgemm (the Paddle CPU wheel's libmklml_intel.so)."""
    if not _gemm:
        _gemm.append(bool(ext.cae_gemm_available(like).numpy()[0] == 1.0))
    return _gemm[0]


def _no_grad_use(*tensors, by_env=True):
    """The extension, for ops without a backward: only when no input needs a gradient."""
    if any(not t.stop_gradient for t in tensors) and paddle.is_grad_enabled():
        return None
    return _use(*tensors, by_env=by_env)



def kernels_for(tensor, *, by_env=True):
    """The kernel module for tensors like ``tensor`` (float32, CPU, dynamic graph, switch on,
    built), or None: for callers that choose their path once (the optimizer, by
    :func:`paddle_cae.fast.accelerate_optimizer`) and pass it back as ``ext``."""
    return _use(tensor, by_env=by_env)



def _use_all(tensors, by_env=True):
    """The extension for a list of whole tensors (one call over all of them), or None."""
    if not tensors or any(not t.is_contiguous() for t in tensors):
        return None
    return _use(*tensors, by_env=by_env)


