"""Training checkpoints: names, atomic saves, auto-resume.

Names follow the Paddle CAE scripts: ``[<exp_name>_]checkpoint-<epoch>.pd`` after an epoch
and ``[<exp_name>_]checkpoint-latest.pd`` for the newest state (also mid-epoch). A training
checkpoint is a plain dict::

    {"model", "optimizer", "epoch", "batches_done", "global_step", "scaler", "teacher",
     "args", "rng", "kind", "model_name"}

``epoch`` is the epoch being trained and ``batches_done`` how many of its batches are in the
weights (``None`` once the epoch is complete); ``images_per_batch`` (batch size x processes) and
the args' ``accum_iter`` say how large those batches were, so a run resumed at another global
batch continues after the same images (:func:`resume_position`) or refuses in one line. Auto-resume loads every candidate with the
safe reader and keeps the most advanced complete one, so a truncated file left by a killed
writer (which the atomic save should never produce) is skipped with a warning.

``kind`` (``pretrain``, ``finetune``, ``linprobe``) and ``model_name`` say what run wrote a
checkpoint. A run only resumes a checkpoint of its own kind and model, and refuses to start in
a folder holding checkpoints of another kind or model under the names it would write (it would
overwrite them): :func:`scan_output_dir` finds both.

Disk: the state of one save is written once (``checkpoint-<epoch>.pd`` is a hard link of the
``checkpoint-latest.pd`` just written, see :func:`save_checkpoint`), temporaries a killed save
left behind are removed at start (:func:`remove_stale_temporaries`), and ``keep_last`` in the
run's args keeps only the newest numbered checkpoints.
"""
import io
import logging
import os
import pickletools
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


def _checkpoint_files(output_dir, exp_name, tags):
    """The files of ``output_dir`` named like a checkpoint of ``exp_name`` whose tag matches
    the regular expression ``tags``, sorted."""
    pattern = re.compile(rf"^{re.escape(checkpoint_prefix(exp_name))}checkpoint-({tags})\.pd$")
    if not output_dir or not os.path.isdir(output_dir):
        return []
    return sorted(os.path.join(output_dir, f) for f in os.listdir(output_dir) if pattern.match(f))


def candidate_checkpoints(output_dir, exp_name=None):
    """The checkpoints a run resumes from (numbered and latest)."""
    return _checkpoint_files(output_dir, exp_name, r"\d+|latest")


OWN_NAME = re.compile(r"checkpoint-(\d+|latest|best)\.pd$")
STALE_TEMPORARY = re.compile(r"^\..*checkpoint-(\d+|latest|best)\.pd\..+\.tmp$")


def written_checkpoints(output_dir, exp_name=None):
    """Every file a run with ``exp_name`` writes checkpoints to (numbered, latest, best)."""
    return _checkpoint_files(output_dir, exp_name, r"\d+|latest|best")


def peek_identity(path, limit=1 << 16):
    """(kind, model_name) from the first bytes of a checkpoint of this package (its first two
    entries), without reading the weights; None when the file does not start that way."""
    try:
        with open(path, "rb") as f:
            head = f.read(limit)
    except OSError:
        return None
    strings = []
    try:
        for opcode, arg, _ in pickletools.genops(io.BytesIO(head)):
            if isinstance(arg, str) and "UNICODE" in opcode.name:
                strings.append(arg)
                if len(strings) == 4:
                    break
            elif opcode.name not in ("PROTO", "FRAME", "EMPTY_DICT", "MEMOIZE", "MARK", "BINPUT",
                                     "LONG_BINPUT", "PUT"):
                break
    except Exception:  # truncated head or not a pickle
        pass
    if len(strings) == 4 and strings[0] == "kind" and strings[2] == "model_name":
        return strings[1], strings[3]
    return None


def identity_matches(found, kind, model_name):
    """Whether a checkpoint written by (kind, model) ``found`` belongs to this run; files that do
    not say (older ones) are taken as belonging."""
    found_kind, found_model = found
    if kind and found_kind and found_kind != kind:
        return False
    return not (model_name and found_model and found_model != model_name)


def describe_identity(kind, model_name):
    article = "an" if str(kind)[:1] in "aeiou" else "a"
    return f"{article} {kind} checkpoint of {model_name}"


class ForeignCheckpointError(ValueError):
    """The output folder holds a checkpoint of another kind of run or another model."""


def scan_output_dir(output_dir, exp_name=None, kind=None, model_name=None, load=True):
    """(resume path, its state, foreign) for a run of ``kind`` and ``model_name`` in
    ``output_dir``: the most advanced complete checkpoint of this run (when ``load``), and
    [(path, kind, model)] of the checkpoints other runs wrote under the names this run writes."""
    best_path, best_state, foreign = None, None, []
    for path in written_checkpoints(output_dir, exp_name):
        found = peek_identity(path)
        if found is not None and not identity_matches(found, kind, model_name):
            foreign.append((path,) + found)
            continue
        if path.endswith("checkpoint-best.pd") or (not load and found is not None):
            continue
        try:
            state = load_checkpoint(path)
        except (CheckpointError, OSError, ValueError) as err:
            logger.warning("auto-resume: ignoring unreadable checkpoint %s (%s)", path, err)
            continue
        if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
            logger.warning("auto-resume: ignoring %s: not a training checkpoint", path)
            continue
        found = (state.get("kind"), state.get("model_name"))
        if not identity_matches(found, kind, model_name):
            foreign.append((path,) + found)
            continue
        if not load:
            continue
        if best_state is None or progress_key(state) > progress_key(best_state):
            best_path, best_state = path, state
    return best_path, best_state, foreign


def check_no_foreign_checkpoints(foreign, kind, model_name):
    """One-line :class:`ForeignCheckpointError` naming the first foreign checkpoint."""
    if not foreign:
        return
    path, found_kind, found_model = foreign[0]
    more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
    raise ForeignCheckpointError(
        f"{path} is {describe_identity(found_kind, found_model)}{more}; this {kind} run of "
        f"{model_name} would overwrite it: pass another --output_dir (or an --exp_name) for "
        "this run")


def remove_stale_temporaries(output_dir):
    """Remove the hidden ``.checkpoint-*.pd.*.tmp`` files a killed save left behind; returns
    their paths. Call before a run starts writing (never while one is saving there)."""
    removed = []
    if not output_dir or not os.path.isdir(output_dir):
        return removed
    for name in sorted(os.listdir(output_dir)):
        if STALE_TEMPORARY.match(name):
            path = os.path.join(output_dir, name)
            try:
                size = os.path.getsize(path)
                os.remove(path)
            except OSError:
                continue
            removed.append(path)
            logger.info("removed %s (%.1f MB) left by an interrupted save", path, size / 1e6)
    return removed


def progress_key(state):
    """Order of training progress: (epoch, batches done in it); a complete epoch counts as
    infinitely many batches of that epoch."""
    done = state.get("batches_done")
    return (int(state["epoch"]), float("inf") if done is None else int(done))


class ResumeBatchError(ValueError):
    """A mid-epoch checkpoint cannot be continued at this run's global batch."""


def resume_position(state, batch_size, world_size, accum_iter, path="checkpoint"):
    """(epoch, first batch, note) at which a run of ``world_size`` processes with
    ``batch_size`` images each per loader batch and ``accum_iter`` continues ``state``.

    The epoch's order of samples does not depend on the batch size (data/sampler.py), so a
    mid-epoch checkpoint is continued by the images it has seen: ``batches_done`` batches of the
    size it was written with are ``images`` images, which are a whole number of this run's
    updates or the resume is refused (:class:`ResumeBatchError`, one line naming both sizes).
    ``note`` is None when nothing changed, else a sentence for the log."""
    epoch = int(state["epoch"])
    done = state.get("batches_done")
    args = state.get("args") or {}
    old_accum = int(args.get("accum_iter") or 1)
    images_per_batch = int(batch_size) * int(world_size)
    old_images = state.get("images_per_batch")
    if old_images is None and args.get("batch_size") is not None:
        # written before the size was stored: its batch size, as many processes as now
        old_images = int(args["batch_size"]) * int(world_size)
    old_images = int(old_images) if old_images is not None else None
    if old_images is None or (old_images == images_per_batch and old_accum == accum_iter):
        return (epoch + 1, 0, None) if done is None else (epoch, int(done), None)
    old_global, new_global = old_images * old_accum, images_per_batch * accum_iter
    sizes = (f"written with {old_images} images per batch x accum_iter {old_accum} "
             f"(global batch {old_global}), this run has {images_per_batch} x {accum_iter} "
             f"(global batch {new_global})")
    if done is None:
        return epoch + 1, 0, f"{path}: {sizes}; the next epoch starts at the new size"
    images = int(done) * old_images
    if images % new_global:
        raise ResumeBatchError(
            f"{path} is mid-epoch {epoch} after {images} images, {sizes}: {images} is not a "
            f"whole number of updates of {new_global}; resume with the global batch it was "
            "written with, or from an epoch-end checkpoint")
    start = images // images_per_batch
    return epoch, start, (f"{path}: {sizes}; continuing epoch {epoch} after the same {images} "
                          f"images, at batch {start}")


def find_resume_checkpoint(output_dir, exp_name=None, kind=None, model_name=None):
    """Path and content of the most advanced complete checkpoint in ``output_dir`` written by a
    run of ``kind`` and ``model_name`` (any, when not given), or (None, None)."""
    path, state, foreign = scan_output_dir(output_dir, exp_name, kind, model_name)
    for other, found_kind, found_model in foreign:
        logger.info("auto-resume: skipping %s: %s", other, describe_identity(found_kind, found_model))
    return path, state


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
    """Save ``state`` as ``checkpoint-<epoch_tag>.pd`` (a hard link when the same state was
    just saved under another name). After a numbered save, ``keep_last`` in the state's args
    removes the older numbered checkpoints."""
    path = checkpoint_path(output_dir, epoch_tag, exp_name)
    save_checkpoint(state, path)
    if epoch_tag != "latest":
        keep_last = ((state.get("args") or {}) if isinstance(state, dict) else {}).get("keep_last")
        prune_checkpoints(output_dir, exp_name, keep_last)
    return path


def prune_checkpoints(output_dir, exp_name=None, keep_last=None):
    """Remove numbered checkpoints beyond the newest ``keep_last`` (None or 0 keeps all);
    ``checkpoint-latest.pd`` and ``checkpoint-best.pd`` are never removed."""
    if not keep_last or int(keep_last) <= 0:
        return []
    numbered = []
    for path in candidate_checkpoints(output_dir, exp_name):
        m = re.search(r"checkpoint-(\d+)\.pd$", path)
        if m:
            numbered.append((int(m.group(1)), path))
    removed = []
    for _, path in sorted(numbered)[:-int(keep_last)]:
        try:
            os.remove(path)
        except FileNotFoundError:
            continue
        removed.append(path)
        logger.info("--keep_last %d: removed %s", int(keep_last), path)
    return removed
