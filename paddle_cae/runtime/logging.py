"""Progress lines with smoothed metrics and ETA, JSON-lines logs and VisualDL curves/images.

Only rank 0 writes files; every rank can print (the launcher keeps one log per rank).
"""
import collections
import datetime
import json
import logging
import os
import sys
import time

import numpy as np

logger = logging.getLogger("paddle_cae")


def resolve_log_dir(output_dir, log_dir):
    """VisualDL folder: ``<output_dir>/vdl`` by default; a relative --log_dir is taken under
    output_dir (the Paddle CAE scripts pass ``--log_dir vdl``)."""
    if not output_dir:
        return log_dir
    if log_dir is None:
        return os.path.join(output_dir, "vdl")
    return log_dir if os.path.isabs(log_dir) else os.path.join(output_dir, log_dir)


class CurrentStdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a message is emitted, not the stream of the
    moment it was made: notebooks and captured runs replace (and close) sys.stdout."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup_console_logging(rank=0):
    """One format for the package's messages; ranks other than 0 only show warnings."""
    root = logging.getLogger("paddle_cae")
    if root.handlers:
        return root
    handler = CurrentStdoutHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False
    return root


class SmoothedValue:
    """Keeps a window of recent values and the global average."""

    def __init__(self, window_size=20, fmt="{median:.4f} ({global_avg:.4f})"):
        self.deque = collections.deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    @property
    def median(self):
        return float(np.median(self.deque)) if self.deque else 0.0

    @property
    def avg(self):
        return float(np.mean(self.deque)) if self.deque else 0.0

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def value(self):
        return self.deque[-1] if self.deque else 0.0

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               value=self.value)


class MetricLogger:
    def __init__(self, delimiter="  "):
        self.meters = collections.defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **values):
        for name, value in values.items():
            if value is None:
                continue
            if hasattr(value, "item"):
                value = value.item()
            self.meters[name].update(float(value))

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def averages(self):
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def log_every(self, iterable, print_freq, header="", total=None, start_index=0,
                  batch_size=None):
        """Yield from ``iterable``; every ``print_freq`` steps print smoothed metrics,
        images per second and the epoch's ETA."""
        total = total if total is not None else len(iterable)
        start = time.time()
        end = start
        iter_time = SmoothedValue(fmt="{avg:.3f}")
        width = len(str(total))
        i = start_index
        for obj in iterable:
            yield obj
            now = time.time()
            iter_time.update(now - end)
            end = now
            i += 1
            if i % print_freq == 0 or i == total:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i)))
                speed = ""
                if batch_size:
                    speed = f"  img/s: {batch_size / max(iter_time.avg, 1e-9):.1f}"
                logger.info(f"{header} [{i:>{width}}/{total}]  eta: {eta}  {self}"
                            f"  time: {iter_time}{speed}")
        elapsed = datetime.timedelta(seconds=int(time.time() - start))
        logger.info(f"{header} total time: {elapsed} ({(time.time() - start) / max(i - start_index, 1):.3f} s/it)")


class JsonLinesLog:
    """Appends one JSON object per line (``log.txt`` of the reference scripts)."""

    def __init__(self, path, enabled=True):
        self.path = path
        self.enabled = enabled and path is not None

    def write(self, record):
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(_plain(record)) + "\n")
            f.flush()


class VisualDLWriter:
    """Scalars and images for VisualDL; a silent no-op when disabled (other ranks, no
    --log_dir) so call sites need no branches.

    What a reader sees first is what matters: the x axis of every scalar is the run's optimizer
    step (``step_of``, a callable set by the training run; the step a caller passes is used only
    without one), so that a demo's 66 updates are 66 points and not a handful of stair steps of
    "thousands of images seen"; the images seen go along as their own curve
    (``progress/images_seen``). The loss curves come first (``train/*`` is written as
    ``loss/*``, ahead of the optimizer's ``opt/*``), tags in ``skip_tags`` (e.g. a loss scale that
    stays 1.0 without fp16) are not written, and small images (32-px reconstructions) are
    enlarged with whole pixels to at least ``min_image_height``."""

    TAG_RENAMES = {"train": "loss"}

    def __init__(self, log_dir, enabled=True, step_of=None, images_per_step=None,
                 min_image_height=256):
        self._writer = None
        self.log_dir = log_dir
        self.step_of = step_of
        self.images_per_step = images_per_step
        self.min_image_height = min_image_height
        self.skip_tags = set()
        self._last_images_seen_step = None
        if enabled and log_dir:
            from visualdl import LogWriter

            os.makedirs(log_dir, exist_ok=True)
            self._writer = LogWriter(logdir=log_dir)

    @property
    def enabled(self):
        return self._writer is not None

    def _x(self, step):
        return int(self.step_of()) if self.step_of is not None else int(step)

    def tag(self, tag):
        prefix, _, rest = tag.partition("/")
        return f"{self.TAG_RENAMES[prefix]}/{rest}" if rest and prefix in self.TAG_RENAMES else tag

    def add_scalar(self, tag, value, step):
        if self._writer is None or value is None or tag in self.skip_tags:
            return
        x = self._x(step)
        self._writer.add_scalar(tag=self.tag(tag), value=float(value), step=x)
        if self.images_per_step and x != self._last_images_seen_step:
            self._last_images_seen_step = x
            self._writer.add_scalar(tag="progress/images_seen", value=float(x * self.images_per_step),
                                    step=x)

    def add_scalars(self, prefix, values, step):
        for name, value in values.items():
            self.add_scalar(f"{prefix}/{name}", value, step)

    def add_image(self, tag, image_hwc_uint8, step):
        if self._writer is not None:
            self._writer.add_image(tag=tag, img=enlarged(image_hwc_uint8, self.min_image_height),
                                   step=self._x(step))

    def add_hparams(self, hparams, metrics):
        """The run's hyper-parameters (numbers, strings, booleans; others as text) against the
        metric tags (VisualDL's hyper-parameter view), also as one text record ``run/arguments``."""
        if self._writer is None:
            return
        plain = {}
        for key, value in sorted(hparams.items()):
            if isinstance(value, bool) or value is None:
                plain[key] = str(value)
            elif isinstance(value, (int, float, str)):
                plain[key] = value
            else:
                plain[key] = json.dumps(_plain(value), default=str)
        self._writer.add_hparams(plain, [self.tag(m) for m in metrics])
        self._writer.add_text("run/arguments", "\n".join(f"{k}: {v}" for k, v in plain.items()), step=0)

    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def enlarged(image_hwc_uint8, min_height):
    """``image`` repeated by a whole factor so that it is at least ``min_height`` pixels high
    (nearest neighbour: every pixel stays a sharp square)."""
    image = np.asarray(image_hwc_uint8)
    factor = max(1, -(-int(min_height) // max(image.shape[0], 1)))
    return image if factor == 1 else np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "size", 1) == 1:
        return obj.item()
    return obj
