"""Training checkpoints: names, atomic saves, auto-resume.

Names follow the Paddle CAE scripts: ``[<exp_name>_]checkpoint-<epoch>.pd`` after an epoch
and ``[<exp_name>_]checkpoint-latest.pd`` for the newest state (also mid-epoch). A training
checkpoint is a plain dict::

    {"model", "optimizer", "epoch", "batches_done", "global_step", "scaler", "teacher",
     "args", "rng", "kind", "model_name"}

``epoch`` is the epoch being trained and ``batches_done`` how many of its batches are in the
weights (``None`` once the epoch is complete). Auto-resume loads every candidate with the
safe reader and keeps the most advanced complete one, so a truncated file left by a killed
writer (which the atomic save should never produce) is skipped with a warning.
"""
import glob
import logging
import os
import random
import re

import numpy as np

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("model", "epoch")


def checkpoint_prefix(exp_name=None):
    return f"{exp_name}_" if exp_name else ""


def checkpoint_path(output_dir, epoch, exp_name=None):
    tag = "latest" if epoch == "latest" else str(int(epoch))
    return os.path.join(output_dir, f"{checkpoint_prefix(exp_name)}checkpoint-{tag}.pd")


def candidate_checkpoints(output_dir, exp_name=None):
    pattern = re.compile(rf"^{re.escape(checkpoint_prefix(exp_name))}checkpoint-(\d+|latest)\.pd$")
    if not output_dir or not os.path.isdir(output_dir):
        return []
    return sorted(p for p in glob.glob(os.path.join(output_dir, "*checkpoint-*.pd"))
                  if pattern.match(os.path.basename(p)))


def progress_key(state):
    """Order of training progress: (epoch, batches done in it); a complete epoch counts as
    infinitely many batches of that epoch."""
    done = state.get("batches_done")
    return (int(state["epoch"]), float("inf") if done is None else int(done))


def find_resume_checkpoint(output_dir, exp_name=None):
    """Path and content of the most advanced complete checkpoint in ``output_dir``, or
    (None, None)."""
    best_path, best_state = None, None
    for path in candidate_checkpoints(output_dir, exp_name):
        try:
            state = load_checkpoint(path)
        except (CheckpointError, OSError, ValueError) as err:
            logger.warning("auto-resume: ignoring unreadable checkpoint %s (%s)", path, err)
            continue
        if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
            logger.warning("auto-resume: ignoring %s: not a training checkpoint", path)
            continue
        if best_state is None or progress_key(state) > progress_key(best_state):
            best_path, best_state = path, state
    return best_path, best_state


def rng_state():
    """Python and numpy global generator states (plain data, safe to pickle and reload)."""
    np_state = np.random.get_state()
    return {"python": _plain_python_state(random.getstate()),
            "numpy": [np_state[0], np_state[1], int(np_state[2]), int(np_state[3]),
                      float(np_state[4])]}


def set_rng_state(state):
    if not state:
        return
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _plain_python_state(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def save_training_checkpoint(state, output_dir, epoch_tag, exp_name=None):
    path = checkpoint_path(output_dir, epoch_tag, exp_name)
    save_checkpoint(state, path)
    return path


def prune_checkpoints(output_dir, exp_name=None, keep_last=None):
    """Remove numbered checkpoints beyond the newest ``keep_last`` (None keeps all)."""
    if not keep_last:
        return
    numbered = []
    for path in candidate_checkpoints(output_dir, exp_name):
        m = re.search(r"checkpoint-(\d+)\.pd$", path)
        if m:
            numbered.append((int(m.group(1)), path))
    for _, path in sorted(numbered)[:-keep_last]:
        os.remove(path)
