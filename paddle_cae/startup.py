"""Process settings the command-line entry points apply before Paddle is imported.

Threads: ``OMP_NUM_THREADS`` is left as the user set it; unset, it becomes 1. Measured on the
project's 2-core machine with the MAE quick start (``python main_pretrain.py``, 3 demo epochs):
29 s with 1 thread and 131 s with 2 threads while the machine was shared (load average ~5);
earlier measurements on the same machine gave 22.7 s vs 70.8 s (busy), and on the idle machine
8.3 s vs 17.9 s. With the cores free,
2 threads help the large matrix products only (ViT-B training ~1.3x), and every elementwise
kernel runs on one thread anyway; 1 thread never collapses when the CPU is shared, and it
is what Paddle itself sets when the variable is unset (more threads also make Paddle print
an OpenBLAS warning at import). Data-parallel runs use one process per core instead.

Noise: what a user cannot act on is kept off the console.

* Paddle's import warns "No ccache found" on every start (its C++-extension helper looks for a
  compiler cache); that says nothing about the user's run and is filtered, in this process and,
  through ``PYTHONWARNINGS``, in the processes it starts (the one-time compilation of the fused
  kernels, data workers, a launcher's workers).
* Paddle's C++ INFO/WARNING log lines (``I1206 ... pir_interpreter.cc ... New Executor is
  Running``, the export's "static graph(PIR) not support input out tensor") are hidden with
  ``GLOG_minloglevel=2`` unless the variable is set; errors still show, and ``GLOG_minloglevel=0``
  brings everything back.
* :func:`native_stdout_silenced` hides what Paddle's C++ code prints straight to the process's
  stdout (``ReduceMeanCheckIfOneDNNSupport`` while an exported model is loaded).
"""
import contextlib
import os
import sys
import warnings

DEFAULT_THREADS = "1"
CCACHE_WARNING = r"No ccache found"
PYTHONWARNINGS_CCACHE = "ignore:No ccache found"
GLOG_LEVEL = "2"  # errors and fatal only


def quiet_paddle_import_warnings(environ=None):
    """Filter the warning Paddle's import raises about ccache (once per process), and in the
    child processes of this one (``PYTHONWARNINGS``)."""
    warnings.filterwarnings("ignore", message=CCACHE_WARNING)
    env = os.environ if environ is None else environ
    given = env.get("PYTHONWARNINGS", "")
    if PYTHONWARNINGS_CCACHE not in given.split(","):
        env["PYTHONWARNINGS"] = ",".join(w for w in (given, PYTHONWARNINGS_CCACHE) if w)


def prepare_process(environ=None):
    """Call before importing paddle: default thread count, quiet import, Paddle's C++ log at
    errors only unless ``GLOG_minloglevel`` is set. Returns the ``OMP_NUM_THREADS`` the process
    will use."""
    env = os.environ if environ is None else environ
    if not str(env.get("OMP_NUM_THREADS", "")).strip():
        env["OMP_NUM_THREADS"] = DEFAULT_THREADS
    if not str(env.get("GLOG_minloglevel", "")).strip():
        env["GLOG_minloglevel"] = GLOG_LEVEL
    quiet_paddle_import_warnings(env)
    return env["OMP_NUM_THREADS"]


@contextlib.contextmanager
def native_stdout_silenced():
    """Send file descriptor 1 to the null device for the block (what C++ code prints with
    ``std::cout`` bypasses ``sys.stdout``); Python's own ``sys.stdout`` is flushed first and
    works again afterwards. Errors still travel as exceptions and on stderr."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no real stdout (e.g. captured in memory)
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 1)
        os.close(saved)


def report_error(err, details=False):
    """Print ``err`` to stderr as ``error: <first line>`` (the other lines too with ``details``:
    e.g. the expected folder tree) and return the exit status of a bad-input error, 2."""
    import sys

    lines = str(err).strip().splitlines()
    print(f"error: {lines[0] if lines else type(err).__name__}", file=sys.stderr)
    for line in lines[1:] if details else ():
        print(line, file=sys.stderr)
    return 2


__all__ = ["DEFAULT_THREADS", "native_stdout_silenced", "prepare_process", "quiet_paddle_import_warnings",
           "report_error"]
