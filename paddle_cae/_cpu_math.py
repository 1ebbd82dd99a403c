"""What the CPU is (/proc/cpuinfo), and the fast matrix-multiply code path of Paddle's MKL on
AMD CPUs.

Paddle's CPU wheel does its matmuls with Intel MKL (``libmklml_intel``). On AMD processors that
MKL falls back to a generic code path; ``MKL_DEBUG_CPU_TYPE=5`` makes this MKL use its AVX2
kernels (which every AMD CPU since Zen has; figures in benchmarks/README.md). The result of a
matmul is a float32 sum in another order, exactly as from any other BLAS; the parity tests pass
either way. MKL reads the variable at its first call, so setting it when the package is imported
(before any matmul) is enough.

Nothing is changed when the user has set ``MKL_DEBUG_CPU_TYPE`` (any value, also empty) or the
processor is not an AMD one.
"""
import os

_VARIABLE = "MKL_DEBUG_CPU_TYPE"
_AVX2 = "5"


def cpuinfo_field(name, cpuinfo="/proc/cpuinfo"):
    """The value of field ``name`` of the first processor in ``cpuinfo`` ('' when unreadable,
    e.g. not Linux)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_vendor(cpuinfo="/proc/cpuinfo"):
    """``vendor_id`` of the CPU: 'AuthenticAMD', 'GenuineIntel', ... ('' when unknown)."""
    return cpuinfo_field("vendor_id", cpuinfo)


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The set of CPU feature flags (empty when unknown)."""
    return set(cpuinfo_field("flags", cpuinfo).split())


def select_mkl_code_path(environ=None, cpuinfo="/proc/cpuinfo"):
    """Set ``MKL_DEBUG_CPU_TYPE=5`` on AMD CPUs unless the user chose a value; returns the value
    now in effect (None when unset)."""
    environ = os.environ if environ is None else environ
    if _VARIABLE not in environ and cpu_vendor(cpuinfo) == "AuthenticAMD":
        environ[_VARIABLE] = _AVX2
    return environ.get(_VARIABLE)
