"""DataLoader worker processes that end with their parent.

A worker is a child of its training process; when that process is killed (``kill -9``, the
out-of-memory killer, a launcher stopping a rank), nothing tells the worker, and it would live
on holding its memory (a few hundred MB each: ten workers x eight ranks are 80 orphans on the
node the restart then uses). :func:`exit_with_parent`, called first in every worker, asks the
Linux kernel to send the worker SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``);
where that is not available a daemon thread polls the parent's pid once a second instead.
"""
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(sig):
    """True when the kernel will send ``sig`` to this process when its parent dies."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent, interval_s):
    while True:
        time.sleep(interval_s)
        if os.getppid() != parent:
            os._exit(1)


def exit_with_parent(interval_s=1.0):
    """Make this (worker) process end when its parent process dies. Returns how: ``"prctl"``
    or ``"watchdog"``."""
    parent = os.getppid()
    how = "prctl" if _set_parent_death_signal(signal.SIGKILL) else "watchdog"
    if how == "watchdog":
        threading.Thread(target=_watch_parent, args=(parent, interval_s), daemon=True,
                         name="parent-watchdog").start()
    if os.getppid() != parent:  # the parent died before the request was in place
        os._exit(1)
    return how


class WorkerInit:
    """A ``worker_init_fn`` that first ties the worker's life to its parent's
    (:func:`exit_with_parent`), then calls ``then(worker_id)`` when given."""

    def __init__(self, then=None):
        self.then = then

    def __call__(self, worker_id):
        exit_with_parent()
        if self.then is not None:
            self.then(worker_id)
