"""Learning-rate, weight-decay, EMA-decay and loss-weight schedules of the official recipes.

Two lr schedules exist:

* MAE style, evaluated at a fractional epoch: :func:`mae_lr_at`.
* BEiT style, a per-iteration float64 array: :func:`cosine_scheduler` (CAE and BootMAE).

Either way a group's lr is ``lr * lr_scale``; :func:`apply_lr` writes that into an optimizer.
"""
import logging
import math

import numpy as np

logger = logging.getLogger("paddle_cae")

# ``--lr_schedule`` values: whether the lr is read from a per-iteration array (BEiT's code: CAE,
# BootMAE) or evaluated at a fractional epoch (MAE's code)
PER_ITERATION = {"mae": False, "beit": True}


def peak_lr(lr, blr, effective_batch, scaled_by_batch=False, scaled_by=""):
    """(peak learning rate, the rule in words) from the flags: ``--blr`` x effective batch / 256
    when ``--lr`` is unset, else ``--lr`` as given or, where the recipe scales it too
    (``scaled_by_batch``; ``scaled_by`` names whose rule that is), x effective batch / 256."""
    if lr is None:
        return blr * effective_batch / 256, f"blr {blr:g} x {effective_batch} / 256"
    if scaled_by_batch:
        return lr * effective_batch / 256, f"lr {lr:g} x {effective_batch} / 256 ({scaled_by} scaling)"
    return lr, "absolute --lr"


def mae_lr_at(epoch, base_lr, min_lr, warmup_epochs, epochs):
    """Half-cycle cosine after a linear warm-up that starts at 0, at fractional ``epoch``."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                     start_warmup_value=0, warmup_steps=-1):
    """Per-iteration values, length ``epochs * niter_per_ep``, float64.

    The warm-up is ``linspace(start_warmup_value, base_value, W)`` with both ends included
    (``W = warmup_steps`` when positive, else ``warmup_epochs * niter_per_ep``), and the cosine
    part starts again from ``base_value`` and stops one step short of ``final_value``.
    """
    total = epochs * niter_per_ep
    warmup_iters = warmup_steps if warmup_steps > 0 else warmup_epochs * niter_per_ep
    if warmup_iters > total:
        raise ValueError(
            f"warm-up of {warmup_iters} iterations is longer than the {total} of the schedule"
        )
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 \
        else np.array([])
    n_cos = total - warmup_iters
    cosine = np.array(
        [final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * i / n_cos))
         for i in range(n_cos)],
        dtype=np.float64,
    )
    schedule = np.concatenate((warmup, cosine)).astype(np.float64)
    assert len(schedule) == total
    return schedule


def ema_decay_for_epoch(epoch, dynamic=False, base_decay=0.999, ramp_epochs=100,
                        dynamic_epochs=300, mid_decay=0.9999, final_decay=0.99999):
    """BootMAE's momentum-teacher decay, set once at the start of each epoch.

    A linear rise from ``base_decay`` to ``mid_decay`` over the first ``ramp_epochs`` epochs
    (not reaching it inside the ramp), then ``mid_decay``; with ``dynamic`` a second linear
    rise to ``final_decay`` over ``dynamic_epochs`` epochs, held afterwards.
    """
    if epoch < ramp_epochs:
        return base_decay + epoch / ramp_epochs * (mid_decay - base_decay)
    if not dynamic:
        return mid_decay
    return mid_decay + min(dynamic_epochs, epoch - ramp_epochs) / dynamic_epochs \
        * (final_decay - mid_decay)


def feature_weight_at(epoch, epochs, feature_weight):
    """BootMAE's weight of the feature-prediction loss: a ramp reaching full weight at 25% of
    training, ``min(4 * fw * (epoch + 1) / epochs, fw)``."""
    return min(4 * feature_weight * (1 + epoch) / epochs, feature_weight)


def apply_lr(optimizer, lr, weight_decay=None):
    """Set the lr (times each group's ``lr_scale``) and, when given, the weight decay of every
    group whose decay is positive (groups exempt from decay stay at 0).

    Works for this package's optimizers (groups in ``param_groups`` with an ``lr`` entry) and
    for Paddle's own (``set_lr`` plus their per-group ``weight_decay``).
    """
    optimizer.set_lr(lr)
    if weight_decay is not None:
        groups = [g for g in (getattr(optimizer, "_param_groups", None) or []) if isinstance(g, dict)]
        for group in groups:
            if group.get("weight_decay", 0.0) > 0:
                group["weight_decay"] = float(weight_decay)
    return lr


class LearningRateSchedule:
    """Per-update learning rate and weight decay.

    ``mae``: half-cycle cosine at a fractional epoch (MAE). ``beit``: the per-iteration
    ``cosine_scheduler`` array of BEiT/CAE/BootMAE, with an optional cosine weight decay."""

    def __init__(self, kind, lr, min_lr, warmup_epochs, epochs, updates_per_epoch,
                 weight_decay, weight_decay_end=None, warmup_steps=-1):
        if kind not in PER_ITERATION:
            raise ValueError(f"lr schedule must be one of {tuple(PER_ITERATION)}, got {kind!r}")
        self.kind = kind
        self.per_iteration = PER_ITERATION[kind]
        self.lr, self.min_lr = lr, min_lr
        self.warmup_epochs, self.epochs = warmup_epochs, epochs
        self.updates_per_epoch = updates_per_epoch
        self.weight_decay = weight_decay
        self.weight_decay_end = weight_decay_end
        if self.per_iteration:
            total = epochs * updates_per_epoch
            warmup_iters = warmup_steps if warmup_steps > 0 else warmup_epochs * updates_per_epoch
            if warmup_iters > total:
                logger.warning("warm-up (%d updates) is longer than the whole run (%d updates): "
                               "the run warms up over all of it", warmup_iters, total)
                warmup_epochs, warmup_steps = 0, total
            self.lr_values = cosine_scheduler(lr, min_lr, epochs, updates_per_epoch, warmup_epochs,
                                              warmup_steps=warmup_steps)
        if weight_decay_end is not None:
            self.wd_values = cosine_scheduler(weight_decay, weight_decay_end, epochs,
                                              updates_per_epoch)
        else:
            self.wd_values = None

    def at(self, epoch, update_in_epoch):
        """(lr, weight decay) for the ``update_in_epoch``-th optimizer update of ``epoch``."""
        index = epoch * self.updates_per_epoch + update_in_epoch
        if self.per_iteration:
            lr = float(self.lr_values[min(index, len(self.lr_values) - 1)])
        else:
            lr = mae_lr_at(epoch + update_in_epoch / self.updates_per_epoch, self.lr, self.min_lr,
                           self.warmup_epochs, self.epochs)
        wd = None
        if self.wd_values is not None:
            wd = float(self.wd_values[min(index, len(self.wd_values) - 1)])
        return lr, wd
