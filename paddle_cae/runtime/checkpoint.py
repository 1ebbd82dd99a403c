"""Checkpoint files of this package (``.pd``): the names the training runtime uses.

The reader and the atomic writer live in :mod:`paddle_cae.io` (``io.pd`` writes, and
``io.weights.read_weights`` reads every weights format); ``load_checkpoint`` is that reader
limited to ``.pd``/``.pdparams`` pickles, as ``--resume`` and the runs' own files need.
"""
from ..io.pd import (  # noqa: F401  (re-exported for the runtime and engine modules)
    PICKLE_PROTOCOL,
    CheckpointError,
    link_checkpoint,
    load_pickle_bytes,
    save_checkpoint,
    to_plain,
)
from ..io.weights import load_checkpoint  # noqa: F401

__all__ = ["CheckpointError", "link_checkpoint", "save_checkpoint", "load_checkpoint", "to_plain"]
