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

Warnings: Paddle's import warns "No ccache found" on every start (its C++-extension helper
looks for a compiler cache); that says nothing about the user's run and is filtered.
"""
import os
import warnings

DEFAULT_THREADS = "1"
CCACHE_WARNING = r"No ccache found"


def quiet_paddle_import_warnings():
    """Filter the warning Paddle's import raises about ccache (once per process)."""
    warnings.filterwarnings("ignore", message=CCACHE_WARNING)


def prepare_process(environ=None):
    """Call before importing paddle: default thread count, quiet import. Returns the
    ``OMP_NUM_THREADS`` the process will use."""
    env = os.environ if environ is None else environ
    if not str(env.get("OMP_NUM_THREADS", "")).strip():
        env["OMP_NUM_THREADS"] = DEFAULT_THREADS
    quiet_paddle_import_warnings()
    return env["OMP_NUM_THREADS"]


def report_error(err, details=False):
    """Print ``err`` to stderr as ``error: <first line>`` (the other lines too with ``details``:
    e.g. the expected folder tree) and return the exit status of a bad-input error, 2."""
    import sys

    lines = str(err).strip().splitlines()
    print(f"error: {lines[0] if lines else type(err).__name__}", file=sys.stderr)
    for line in lines[1:] if details else ():
        print(line, file=sys.stderr)
    return 2


__all__ = ["DEFAULT_THREADS", "prepare_process", "quiet_paddle_import_warnings", "report_error"]
