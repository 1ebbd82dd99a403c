"""Batch sampling that makes a run independent of how many processes share it.

Every epoch has one global order (a permutation seeded by (seed, epoch)). It is cut into
global batches of ``batch_size * world_size`` samples, and rank r takes the r-th slice of
each global batch. So N processes at batch b see exactly the samples one process sees at
batch N*b, in the same global batches, and per-sample augmentation seeded by the sample
index (``loader.SeededSamples``) makes their inputs identical too. ``start_batch`` skips
batches already trained on when a run resumes mid-epoch.
"""
import math

import numpy as np


class GlobalBatchSampler:
    def __init__(self, num_samples, batch_size, world_size=1, rank=0, shuffle=True,
                 drop_last=True, seed=0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(seed)
        self.epoch = 0
        self.start_batch = 0
        global_batch = self.batch_size * self.world_size
        if drop_last and self.num_samples < global_batch:
            raise ValueError(
                f"the dataset has {self.num_samples} images, fewer than one global batch of "
                f"{global_batch} (batch_size {batch_size} x {world_size} processes); "
                "lower --batch_size")

    @property
    def global_batch_size(self):
        return self.batch_size * self.world_size

    def set_epoch(self, epoch, start_batch=0):
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def batches_per_epoch(self):
        if self.drop_last:
            return self.num_samples // self.global_batch_size
        return math.ceil(self.num_samples / self.global_batch_size)

    def __len__(self):
        return max(self.batches_per_epoch() - self.start_batch, 0)

    def order(self):
        if not self.shuffle:
            return np.arange(self.num_samples)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch])
        return rng.permutation(self.num_samples)

    def __iter__(self):
        order = self.order()
        g = self.global_batch_size
        total = self.batches_per_epoch()
        if not self.drop_last and total * g > len(order):
            # pad by wrapping so every rank gets a full batch (evaluation de-duplicates)
            order = np.concatenate([order, order[: total * g - len(order)]])
        for b in range(self.start_batch, total):
            chunk = order[b * g:(b + 1) * g]
            yield chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()
