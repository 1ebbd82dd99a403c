"""DataLoader construction: distributed batching, reproducible augmentation, corrupt-image counts.

Reproducibility, in two layers:

* order: :class:`.sampler.GlobalBatchSampler` shuffles with a generator seeded by
  ``(seed, epoch)`` and gives rank r the r-th slice of every global batch, so N processes at
  batch b see the samples one process sees at batch N*b (the one training order);
* augmentation: every sample is produced under per-sample generators seeded from
  ``(seed, epoch, index)`` (``transforms.sample_rng``, thread-local). So sample ``i`` of epoch
  ``e`` gets the same crop, flip and mask whatever the number of workers or ranks, and the
  global ``random``/numpy streams of the training loop are neither used nor disturbed (with
  ``num_workers=0`` Paddle fetches in a background thread, so reseeding globals would race).
  ``worker_init_fn`` additionally seeds ``random``, numpy and Paddle in each worker from
  ``(seed, epoch, rank, worker_id)`` for code that draws from the global streams.

Iterating a :class:`Loader` yields dicts of Paddle tensors; each holds ``"replaced"`` ([B]
int64, -1 or the index of the unreadable image the sample replaced). The loader counts them:
``loader.replaced_this_epoch`` and ``loader.replaced_total``.
"""
import logging
import random

import numpy as np
import paddle
from paddle.io import DataLoader

from .sampler import GlobalBatchSampler
from .transforms import sample_rng
from .workers import exit_with_parent

logger = logging.getLogger(__name__)


def derive_seed(*parts):
    """A 32-bit seed mixing integer parts (order matters); stable across runs and platforms."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class SeededSamples:
    """Wraps a dataset so that item ``i`` is produced under seeds derived from (seed, epoch, i)."""

    def __init__(self, dataset, seed=0, epoch=0):
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with sample_rng(derive_seed(self.seed, self.epoch, index)):
            return self.dataset[index]


def collate_samples(samples):
    """List of sample dicts -> dict of stacked numpy arrays (the DataLoader makes them tensors)."""
    keys = samples[0].keys()
    batch = {}
    for key in keys:
        values = [s[key] for s in samples]
        try:
            batch[key] = np.stack([np.asarray(v) for v in values])
        except ValueError as err:
            shapes = sorted({tuple(np.shape(v)) for v in values})
            raise ValueError(f"cannot batch '{key}': samples have shapes {shapes}") from err
    return batch


def num_replaced(batch):
    """How many samples of a batch stand in for an unreadable image."""
    replaced = batch.get("replaced") if isinstance(batch, dict) else None
    if replaced is None:
        return 0
    return int((np.asarray(replaced.numpy() if hasattr(replaced, "numpy") else replaced) >= 0).sum())


class _WorkerSeeder:
    """``worker_init_fn``: seeds ``random``, numpy and Paddle from (seed, epoch, rank, worker)."""

    def __init__(self, seed, rank):
        self.seed = int(seed)
        self.rank = int(rank)
        self.epoch = 0

    def __call__(self, worker_id):
        exit_with_parent()  # no orphan workers when the training process is killed
        worker_seed = derive_seed(self.seed, self.epoch, self.rank, worker_id)
        random.seed(worker_seed)
        np.random.seed(worker_seed)
        paddle.seed(worker_seed)


class Loader:
    """An epoch-aware DataLoader: ``set_epoch(e)``, then iterate."""

    def __init__(self, dataset, batch_sampler, seeded, worker_seeder, data_loader):
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self._seeded = seeded
        self._worker_seeder = worker_seeder
        self.data_loader = data_loader
        self.epoch = 0
        self.replaced_this_epoch = 0
        self.replaced_total = 0

    def set_epoch(self, epoch, start_batch=0):
        """Epoch ``epoch`` from its batch ``start_batch`` on (a run resumed mid-epoch)."""
        self.epoch = int(epoch)
        self.batch_sampler.set_epoch(self.epoch, start_batch)
        self._seeded.epoch = self.epoch
        self._worker_seeder.epoch = self.epoch

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        self.replaced_this_epoch = 0
        # the "replaced" entries are read when the epoch ends, not per batch: on a GPU the batch
        # is already on the device, and reading it would make the host wait for the step queue
        pending = []
        try:
            for batch in self.data_loader:
                replaced = batch.get("replaced") if isinstance(batch, dict) else None
                if replaced is not None:
                    pending.append(replaced)
                yield batch
        finally:
            self._count_replaced(pending)

    def _count_replaced(self, pending):
        if not pending:
            return
        tensors = [t.reshape([-1]) for t in pending if isinstance(t, paddle.Tensor)]
        values = [np.asarray(t).ravel() for t in pending if not isinstance(t, paddle.Tensor)]
        if tensors:
            values.append(paddle.concat(tensors).numpy())  # one read for the epoch
        bad = np.concatenate(values)
        bad = bad[bad >= 0]
        if bad.size:
            self.replaced_this_epoch += int(bad.size)
            self.replaced_total += int(bad.size)
            known_bad = getattr(self.dataset, "known_bad", None)
            if known_bad is not None:
                # workers started in later epochs inherit this and skip the file silently
                known_bad.update(int(i) for i in bad)


def build_loader(dataset, batch_size, seed=0, num_workers=0, world_size=1, rank=0, epoch=0,
                 shuffle=True, drop_last=True, collate_fn=collate_samples):
    """The training loader: global batches of ``batch_size x world_size`` split across ranks
    (:class:`.sampler.GlobalBatchSampler`), per-sample seeded augmentation: the same samples
    and inputs whatever the number of processes or workers. Returns a :class:`Loader`; call
    ``set_epoch`` each epoch."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    sampler = GlobalBatchSampler(len(dataset), batch_size, world_size, rank, shuffle=shuffle,
                                 drop_last=drop_last, seed=seed)
    seeded = SeededSamples(dataset, seed=seed)
    seeder = _WorkerSeeder(seed, rank)
    workers = int(num_workers)
    data_loader = DataLoader(seeded, batch_sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                             use_shared_memory=workers > 0, worker_init_fn=seeder if workers > 0 else None)
    loader = Loader(dataset, sampler, seeded, seeder, data_loader)
    loader.set_epoch(epoch)
    return loader
