"""What a training loop logs, without making the host wait for the device every step, and what
it says when the loss stops being finite.

:class:`DeferredScalars` keeps the logged scalars of each step (loss parts, gradient norm) on
the device, summed, and hands them to the host every ``every`` steps in one transfer. The loop
reads a finished interval one step late, after the next step's forward has been queued, so the
device always has work while the host waits: the only blocking read of a step is the stepper's
finite flag, which the decision to skip an update needs (engine/stepper.py).

:class:`LossTrend` keeps the losses read that way and the checkpoints written meanwhile, so a
run stopped by a non-finite loss names the last checkpoint written while the loss was still
sane (not merely the last one with finite weights: a diverging run keeps writing those), shows
the trend, and suggests the usual remedies.
"""
import collections
import math

import paddle


class DeferredScalars:
    """Per-step scalars summed on the device; read every ``every`` steps, one transfer."""

    def __init__(self, every):
        self.every = max(int(every), 1)
        self._sums = {}  # name -> 0-d float32 tensor (device) or python float
        self._counts = collections.Counter()
        self._steps = 0
        self._queued = None

    def add(self, values):
        """Add one step's ``values`` (name -> 0-d tensor, number or None; no host sync). After
        ``every`` steps the interval is queued for :meth:`read_queued`."""
        for name, value in values.items():
            if value is None or isinstance(value, bool):
                continue
            if isinstance(value, paddle.Tensor):
                if value.size != 1:
                    continue
                value = value.detach().reshape([]).astype("float32")
            elif not isinstance(value, (int, float)):
                continue
            previous = self._sums.get(name)
            self._sums[name] = value if previous is None else previous + value
            self._counts[name] += 1
        self._steps += 1
        if self._steps >= self.every and self._queued is None:
            self._queued = self._take()

    def _take(self):
        taken = (self._sums, dict(self._counts))
        self._sums, self._counts, self._steps = {}, collections.Counter(), 0
        return taken

    def read_queued(self):
        """The means of the queued interval, ``{name: (mean, steps)}`` (one host sync), or
        None when no interval is complete. Call it after the next step has been queued."""
        if self._queued is None:
            return None
        queued, self._queued = self._queued, None
        return _means(*queued)

    def flush(self):
        """Everything not read yet, queued interval and the current partial one, as one dict
        of ``{name: (mean, steps)}`` (one host sync; empty when there is nothing)."""
        parts = []
        if self._queued is not None:
            parts.append(self._queued)
            self._queued = None
        if self._steps:
            parts.append(self._take())
        sums, counts = {}, collections.Counter()
        for part_sums, part_counts in parts:
            for name, value in part_sums.items():
                sums[name] = value if name not in sums else sums[name] + value
                counts[name] += part_counts[name]
        return _means(sums, counts) if sums else {}


def _means(sums, counts):
    names = [n for n, v in sums.items() if isinstance(v, paddle.Tensor)]
    values = {n: float(v) for n, v in sums.items() if not isinstance(v, paddle.Tensor)}
    if names:
        stacked = paddle.stack([sums[n] for n in names]).numpy().tolist()  # the one sync
        values.update(zip(names, stacked))
    return {n: (values[n] / counts[n], counts[n]) for n in sums}


def update_metrics(metrics, means):
    """Feed ``{name: (mean, steps)}`` into a MetricLogger, weighted by the steps, so its
    global averages are the exact per-step averages."""
    for name, (mean, steps) in (means or {}).items():
        metrics.meters[name].update(float(mean), n=int(steps))


class LossTrend:
    """Loss readings (means of logging intervals) and the checkpoints written between them.

    A checkpoint counts as sane when the last reading before it was finite and at most
    ``factor`` times the lowest reading so far: a run that diverges keeps writing checkpoints
    whose weights are finite but already far off (a largest weight of 1e7)."""

    def __init__(self, keep=8, factor=2.0):
        self.readings = collections.deque(maxlen=keep)  # (where, loss)
        self.best = math.inf
        self.factor = float(factor)
        self.saved = {}  # path -> (order, loss at the save, sane)
        self._order = 0

    def reading(self, where, loss):
        loss = float(loss)
        self.readings.append((where, loss))
        if math.isfinite(loss):
            self.best = min(self.best, loss)

    def last(self):
        return self.readings[-1][1] if self.readings else None

    def checkpoint(self, path, loss=None):
        """``path`` now holds the state written after the last reading (or at ``loss``)."""
        loss = self.last() if loss is None else float(loss)
        sane = loss is None or (math.isfinite(loss) and loss <= self.factor * self.best)
        self._order += 1
        self.saved[path] = (self._order, loss, sane)

    def last_sane_checkpoint(self):
        sane = [(order, path, loss) for path, (order, loss, ok) in self.saved.items() if ok]
        return max(sane)[1:] if sane else (None, None)

    def describe(self):
        """The recent readings, oldest first: ``'0.61 (epoch 2, batch 0) -> 0.58 -> ...'``."""
        if not self.readings:
            return "no loss read yet"
        parts = [f"{loss:.4g} ({where})" if k == 0 else f"{loss:.4g}"
                 for k, (where, loss) in enumerate(self.readings)]
        return " -> ".join(parts)

    def stop_message(self, where, error, amp=False):
        """The one-line message of a run stopped by a non-finite loss at ``where``."""
        path, loss = self.last_sane_checkpoint()
        if path is None:
            resume = "no checkpoint was written while the loss was sane"
        else:
            resume = (f"last checkpoint written while the loss was sane: {path}"
                      + ("" if loss is None else f" (loss {loss:.4g})"))
        later = [p for p, (order, _, ok) in sorted(self.saved.items(), key=lambda kv: kv[1][0])
                 if not ok]
        if later:
            resume += f"; written after the loss began to rise: {', '.join(later[-2:])}"
        remedies = ("restart" + ("" if path is None else " from it") + " with a lower learning "
                    "rate (--lr/--blr, e.g. half) or gradient clipping (--clip_grad, e.g. 3.0)")
        if amp:
            remedies += ", or --amp false"
        return (f"stopping: non-finite loss at {where} ({error}); loss trend: {self.describe()}; "
                f"{resume}; {remedies}")
