"""Top-1 / top-5 evaluation in which every validation image counts exactly once.

A distributed sampler that pads the validation set by repeating images makes the accuracy
depend on the number of processes. Here rank r evaluates images r, r + W, r + 2W, ... (no
padding, so ranks may get one image more or less), and the per-rank counts of images, correct
top-1, correct top-5 and summed loss are added over ranks once at the end. The ranks never
run a collective inside the loop, so an uneven number of batches is fine.
"""
import math

import numpy as np
import paddle
import paddle.nn.functional as F

from ..data.loader import SeededSamples, collate_samples
from ..data.workers import WorkerInit
from ..runtime import distributed as dist_rt
from ..runtime.logging import MetricLogger


class ShardSampler:
    """Batches of the indices ``rank, rank + world_size, ...`` of ``num_samples``, in order."""

    def __init__(self, num_samples, batch_size, world_size=1, rank=0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.indices = list(range(rank, int(num_samples), int(world_size)))
        self.batch_size = int(batch_size)

    def __len__(self):
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            yield self.indices[start:start + self.batch_size]


def build_eval_loader(dataset, batch_size, env, dist_eval=True, num_workers=0):
    """Without ``dist_eval`` every rank evaluates the whole set (and counts are not summed)."""
    world, rank = (env.world_size, env.rank) if dist_eval else (1, 0)
    sampler = ShardSampler(len(dataset), batch_size, world, rank)
    loader = paddle.io.DataLoader(SeededSamples(dataset, seed=0), batch_sampler=sampler,
                                  num_workers=num_workers, collate_fn=collate_samples,
                                  use_shared_memory=num_workers > 0,
                                  worker_init_fn=WorkerInit() if num_workers > 0 else None)
    loader.sums_over_ranks = bool(dist_eval and env.distributed)
    return loader


def topk_correct(logits, labels, ks=(1, 5)):
    """Number of samples whose label is among the top-k logits, for each k (k capped at the
    number of classes)."""
    num_classes = logits.shape[-1]
    kmax = min(max(ks), num_classes)
    top = paddle.topk(logits, k=kmax, axis=-1)[1]  # [B, kmax]
    hits = (top == labels.reshape([-1, 1]).astype(top.dtype)).astype("float32")  # [B, kmax]
    return [float(hits[:, :min(k, num_classes)].sum().item()) for k in ks]


@paddle.no_grad()
def evaluate(model, loader, precision=None, print_freq=50, header="Test:"):
    """Returns ``{"acc1", "acc5" (percent), "loss" (mean cross entropy), "images" (count)}``
    over the whole validation set."""
    model.eval()
    totals = {"images": 0.0, "correct1": 0.0, "correct5": 0.0, "loss_sum": 0.0}
    metrics = MetricLogger()
    for batch in metrics.log_every(loader, print_freq, header):
        images, labels = batch["images"], batch["labels"]
        if precision is not None:
            with precision.autocast():
                logits = model(images)
        else:
            logits = model(images)
        logits = logits.astype("float32")
        loss = F.cross_entropy(logits, labels.reshape([-1, 1]), reduction="sum")
        c1, c5 = topk_correct(logits, labels)
        n = float(labels.shape[0])
        totals["images"] += n
        totals["correct1"] += c1
        totals["correct5"] += c5
        totals["loss_sum"] += float(loss.item())
        metrics.update(acc1=100.0 * c1 / n, acc5=100.0 * c5 / n)
    if getattr(loader, "sums_over_ranks", False):
        totals = dist_rt.all_reduce_sum(totals)
    n = max(totals["images"], 1.0)
    return {"acc1": 100.0 * totals["correct1"] / n, "acc5": 100.0 * totals["correct5"] / n,
            "loss": totals["loss_sum"] / n, "images": int(round(totals["images"]))}


def predictions(model, images):
    """Softmax probabilities [B, C] as numpy, in eval mode, no gradient."""
    model.eval()
    with paddle.no_grad():
        return np.asarray(F.softmax(model(images).astype("float32"), axis=-1).numpy())


__all__ = ["ShardSampler", "build_eval_loader", "evaluate", "predictions", "topk_correct"]
