"""The one builder of the wing's native code: the C++ kernels (a Paddle custom-operator
extension, :mod:`paddle_cae.fast.kernels.extension`) and the C resampler (ctypes,
:mod:`paddle_cae.fast.resample`).

* :func:`best_isa`: the best vector instruction set of a table the CPU has (/proc/cpuinfo).
* :func:`build_dir`: the cache folder, keyed by the sources, the flags and the instruction set,
  under ``$PADDLE_CAE_OPS_DIR`` (default ``~/.cache/paddle_cae/ops``), so that a cache shared by
  different machines never runs code built for instructions a machine lacks.
* :func:`build_once`: compile into that folder under a file lock (concurrent first uses wait; a
  finished build is never redone).
* :class:`NativeLibrary`: load once per process, run the library's self-check, and where either
  fails say why once in the log; the callers then use the reference code.
"""
import contextlib
import hashlib
import logging
import os
import threading

from .._cpu_math import cpu_flags
from . import switches

logger = logging.getLogger("paddle_cae")

HERE = os.path.dirname(os.path.abspath(__file__))


def source_path(name):
    return os.path.join(HERE, name)


def best_isa(table, wanted="", cpuinfo="/proc/cpuinfo"):
    """(name, compiler flags) of the first entry of ``table`` — (name, needed cpuinfo flags,
    compiler flags), best first — this CPU has ('generic', [] when none); ``wanted`` may pick a
    lesser one the CPU also has."""
    flags = cpu_flags(cpuinfo)
    usable = [(name, list(cflags)) for name, needed, cflags in table if set(needed) <= flags]
    usable.append(("generic", []))
    for name, cflags in usable:
        if name == wanted:
            return name, cflags
    return usable[0]


def build_dir(prefix, sources, key_parts, isa_name):
    """``$PADDLE_CAE_OPS_DIR/<prefix>-<digest>-<isa>``: the digest covers the sources' bytes
    and ``key_parts`` (compiler, flags, versions)."""
    digest = hashlib.sha1()
    for path in sources:
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(" ".join(key_parts).encode())
    return os.path.join(switches.ops_dir(), f"{prefix}-{digest.hexdigest()[:10]}-{isa_name}")


@contextlib.contextmanager
def locked(folder):
    """An exclusive file lock on ``folder`` (created if missing)."""
    import fcntl

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def build_once(folder, artifact, compile_fn):
    """``artifact`` (a path inside ``folder``), made by ``compile_fn()`` under the folder's lock
    unless it is there already."""
    if os.path.isfile(artifact):
        return artifact
    with locked(folder):
        if not os.path.isfile(artifact):
            compile_fn()
    return artifact


def first_line(err):
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


class NativeLibrary:
    """A native library loaded once per process. ``load()`` builds and returns it (raising
    when it cannot); ``check(lib)`` returns '' or why the library must not be used;
    ``off_reason()`` returns a reason when a switch turned it off (then nothing is built)."""

    def __init__(self, what, load, check=None, off_reason=None,
                 fallback="using the reference code"):
        self.what, self.fallback = what, fallback
        self._load, self._check, self._off = load, check, off_reason
        self._lock = threading.Lock()
        self._lib, self._tried, self.reason = None, False, None

    def get(self):
        """The library, or None (:attr:`reason` says why)."""
        if self._tried:
            return self._lib
        with self._lock:
            if self._tried:
                return self._lib
            lib, reason = None, self._off() if self._off is not None else None
            if reason is None:
                try:
                    lib = self._load()
                    problem = self._check(lib) if self._check is not None else ""
                    if problem:
                        lib, reason = None, problem
                except Exception as err:  # noqa: BLE001  no compiler, read-only home, ...
                    lib, reason = None, first_line(err)
            self._lib, self.reason, self._tried = lib, reason, True
            if reason is not None:
                log = logger.info if self._off is not None and reason == self._off() \
                    else logger.warning
                log("%s off (%s); %s", self.what, reason, self.fallback)
            return lib

    @property
    def tried(self):
        return self._tried

    def reset(self):
        """Forget the loaded library (tests; the next :meth:`get` loads and checks again)."""
        with self._lock:
            self._lib, self._tried, self.reason = None, False, None
