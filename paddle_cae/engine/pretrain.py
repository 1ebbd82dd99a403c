"""Pretraining, written once for every pretraining model.

A pretraining model takes a batch dict and returns ``{"loss": total, <parts>...}``. The
engine turns a loader batch into that dict in three steps: the uint8 images become float32 on
the device with the pipeline's conversions (stated once per run, ``dataset.conversions``), the
method's ``finish_batch(batch, batch_seed)`` makes the draws taken once per global batch, from
a seed that is the same on every rank for one global batch (BootMAE: the roll that turns
``order`` into ``idx_shuffle``), and the entries the model declares (``model.input_keys``)
are kept. The method's epoch schedules reach the model as forward arguments
(``Method.forward_kwargs``, BootMAE's feature-loss ramp) and as the momentum of a teacher's
EMA step after each optimizer step (``Method.teacher_momentum`` -> ``model.update_teacher(m)``).

Models declare optional hooks instead of the engine knowing them:
``extra_state()`` / ``load_extra_state(state)`` (saved beside the weights),
``encoder_state_dict()`` (the encoder-only export) and ``reconstruction_image(batch, out)``
(VisualDL images).

Randomness is derived from (seed, epoch, batch index): data order, augmentation and masks in
the data pipeline (per sample), and ``paddle.seed`` before each forward for what the model
draws itself. A resumed run (also mid-epoch) and a run with more processes therefore see the
same numbers as an uninterrupted single-process run with the same global batch.
"""
import json
import logging
import os

import numpy as np
import paddle

from ..data.loader import derive_seed
from ..data.pipeline import to_model_floats
from ..methods import get_method
from ..runtime import distributed as dist_rt
from ..runtime.checkpoint import save_checkpoint, to_plain
from ..runtime.logging import MetricLogger, SmoothedValue
from ..runtime.resume import checkpoint_path, save_training_checkpoint
from .run import TrainingRun
from .scalars import DeferredScalars, update_metrics
from .stepper import NonFiniteLossError

logger = logging.getLogger("paddle_cae")

def training_inputs(method, model, batch, batch_seed, conversions=None):
    """A loader batch -> what the pretraining ``model`` takes: its uint8 images as float32
    (``conversions``: image key -> :class:`paddle_cae.data.pipeline.ToFloat`), the method's
    per-batch step (:meth:`paddle_cae.methods.Method.finish_batch`), then the entries the
    model declares (``model.input_keys``)."""
    batch = method.finish_batch(to_model_floats(batch, conversions or {}), batch_seed)
    return {k: v for k, v in batch.items() if k in model.input_keys}


def _is_scalar(value):
    return isinstance(value, paddle.Tensor) and value.size == 1 or \
        (isinstance(value, (int, float)) and not isinstance(value, bool))


def scalar_parts(outputs, extra=None):
    """The 0-d entries of a model's output dict (and of ``extra``, e.g. the gradient norm),
    as python floats, by name; the tensors are read back in one transfer (one host sync)."""
    parts, names, tensors = {}, [], []
    for name, value in list(outputs.items()) + list((extra or {}).items()):
        if isinstance(value, paddle.Tensor) and value.size == 1:
            names.append(name)
            tensors.append(value.detach().reshape([1]).astype("float64"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            parts[name] = float(value)
    if tensors:
        values = paddle.concat(tensors).numpy().tolist() if len(tensors) > 1 \
            else tensors[0].numpy().tolist()
        parts.update(zip(names, values))
    return parts


class PretrainRun(TrainingRun):
    """Holds everything one pretraining run needs; ``fit()`` trains to the last epoch."""

    kind = "pretrain"

    def __init__(self, args, model, dataset, optimizer, precision, env):
        super().__init__(args, model, dataset, optimizer, precision, env)
        self.dataset = dataset
        self.method = get_method(args.method)
        self.conversions = getattr(dataset, "conversions", {})  # uint8 -> float32, on the device
        self.vis_freq = int(getattr(args, "vis_freq", 0) or 0)
        self.save_latest_freq = int(getattr(args, "save_latest_freq", 0) or 0)
        self._scalars = None  # the epoch's DeferredScalars, while it trains

    def extra_state(self):
        core = self.model_core
        extra = core.extra_state()
        return {"extra": extra} if extra else {}

    def restore_extra(self, state):
        if "extra" in state:
            self.model_core.load_extra_state(state["extra"])

    def save(self, epoch, batches_done, numbered):
        if not self.output_dir:
            return
        self._read_scalars(None, epoch, batches_done, flush=True)  # the loss it is saved at
        tags = ["latest"] + ([epoch] if numbered else [])
        if self.env.is_main:
            state = self.training_state(epoch, batches_done)
            for tag in tags:
                path = save_training_checkpoint(state, self.output_dir, tag, self.exp_name)
                self.last_good_checkpoint = path
            logger.info("saved %s", path)
        for tag in tags:  # every rank knows what was written, for a non-finite stop's message
            self.loss_trend.checkpoint(checkpoint_path(self.output_dir, tag, self.exp_name))

    # -------------------------------------------------------------------- train
    def fit(self):
        for epoch, start_batch in self.epochs_to_run():
            stats = self.train_one_epoch(epoch, start_batch)
            self.save(epoch, None, self.keeps_numbered_checkpoint(epoch))
            record = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch}
            if self.env.distributed:
                # data-parallel replicas must stay bit-identical; say so if they drift
                record["ranks_in_sync"] = dist_rt.ranks_in_sync(self.model_core)
                if not record["ranks_in_sync"]:
                    logger.warning("epoch %d: the model differs between ranks", epoch)
            self.json_log.write(record)
        if self.output_dir and self.env.is_main:
            self.export_encoder()
        self.writer.close()
        return self

    def train_one_epoch(self, epoch, start_batch=0):
        args = self.args
        model, core = self.model, self.model_core
        model.train()
        batches = self.epoch_batches(epoch, start_batch)
        forward_kwargs = self.method.forward_kwargs(core, epoch)
        momentum = self.method.teacher_momentum(core, epoch)
        metrics = MetricLogger()
        metrics.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.3e}"))
        header = f"Epoch: [{epoch}]"
        total = self.batches_per_epoch
        global_batch = args.batch_size * self.env.world_size
        iterator = metrics.log_every(batches, args.print_freq, header, total=total,
                                     start_index=start_batch, batch_size=global_batch)
        self._scalars, self._metrics = DeferredScalars(args.print_freq), metrics
        for i, batch in enumerate(iterator, start=start_batch):
            self.begin_batch(epoch, i)
            inputs = training_inputs(self.method, core, batch, derive_seed(args.seed, epoch, i),
                                     self.conversions)
            with self.stepper.autocast(i):  # no_sync for the forward too, see engine/stepper.py
                outputs = model(inputs, **forward_kwargs)
            # the logged scalars of the last interval, read now that this step is queued
            self._read_scalars(metrics, epoch, i)
            try:
                info = self.stepper.backward(outputs["loss"], i)
            except NonFiniteLossError as err:
                self._read_scalars(metrics, epoch, i, flush=True)
                raise NonFiniteLossError(self.loss_trend.stop_message(
                    f"epoch {epoch}, batch {i}", err, self.precision.enabled)) from None
            if info["stepped"]:
                self.global_step += 1
                if momentum is not None:
                    core.update_teacher(momentum)
            self._scalars.add({**{k: v for k, v in outputs.items() if _is_scalar(v)},
                               "grad_norm": info["grad_norm"]})
            scale = info["loss_scale"] if self.stepper.scaler.enabled else None
            metrics.update(lr=self.optimizer.get_lr(), loss_scale=scale)
            if info["stepped"]:
                update = i // self.accum_iter + 1
                if self.save_latest_freq and update % self.save_latest_freq == 0 \
                        and i + 1 < total:
                    self.save(epoch, i + 1, numbered=False)
            if self.vis_freq and self.writer.enabled and i % self.vis_freq == 0:
                image = core.reconstruction_image(inputs, outputs)
                if image is not None:
                    self.writer.add_image("reconstruction", image, self._x_step(epoch, i))
        self._read_scalars(metrics, epoch, total, flush=True)
        self._scalars = None
        averages = dist_rt.all_reduce_mean(metrics.averages())
        replaced = dist_rt.all_reduce_sum({"replaced": self.loader.replaced_this_epoch})
        averages["replaced_images"] = replaced["replaced"]
        if averages["replaced_images"]:
            logger.warning("epoch %d: %d unreadable image(s) were replaced by other samples",
                           epoch, int(averages["replaced_images"]))
        logger.info("Epoch %d averaged stats: %s", epoch,
                    "  ".join(f"{k}: {v:.4g}" for k, v in averages.items()))
        return averages

    # ----------------------------------------------------------------- helpers
    def _x_step(self, epoch, i):
        """VisualDL x axis: images seen, in units of 1000 (as the official logs)."""
        return int((epoch * self.batches_per_epoch + i) * self.args.batch_size
                   * self.env.world_size / 1000)

    def _read_scalars(self, metrics, epoch, i, flush=False):
        """Read the logged scalars of a finished interval (every --print_freq steps; all that
        is pending with ``flush``): into the progress meters, the loss trend and VisualDL."""
        if self._scalars is None:
            return
        means = self._scalars.flush() if flush else self._scalars.read_queued()
        if not means:
            return
        update_metrics(metrics if metrics is not None else self._metrics, means)
        if "loss" in means:
            self.loss_trend.reading(f"epoch {epoch}, batch {i}", means["loss"][0])
        if self.writer.enabled:
            step = self._x_step(epoch, i)
            grad_norm = means.pop("grad_norm", None)
            self.writer.add_scalars("train", {k: v for k, (v, _) in means.items()}, step)
            self.writer.add_scalar("opt/lr", self.optimizer.get_lr(), step)
            if self.stepper.scaler.enabled:
                self.writer.add_scalar("opt/loss_scale", self.stepper.scaler.scale, step)
            if grad_norm is not None:
                self.writer.add_scalar("opt/grad_norm", grad_norm[0], step)

    def export_encoder(self):
        core = self.model_core
        path = os.path.join(self.output_dir,
                            f"{self.exp_name + '_' if self.exp_name else ''}encoder.pd")
        state = {"kind": "encoder", "model_name": self.args.model,
                 "model": {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v)
                           for k, v in core.encoder_state_dict().items()},
                 "args": to_plain(vars(self.args))}
        save_checkpoint(state, path)
        logger.info("encoder weights for fine-tuning: %s", path)
        return path


def describe_start(args, env, model, dataset, run):
    n_train = sum(int(np.prod(p.shape)) for p in model.parameters() if not p.stop_gradient)
    eff = args.batch_size * args.accum_iter * env.world_size
    lines = [
        f"model {args.model}: {n_train / 1e6:.2f}M trainable parameters",
        f"data: {len(dataset)} training images from {getattr(dataset, 'root', '?')}",
        f"effective batch size {eff} = {args.batch_size} per process x {args.accum_iter} "
        f"accumulation x {env.world_size} process(es); {run.updates_per_epoch} updates per epoch",
        f"learning rate {args.abs_lr:.3e} ({args.lr_rule}), min {args.min_lr:g}, warmup "
        f"{args.warmup_epochs} epoch(s), schedule '{args.lr_schedule}'",
    ]
    if run.precision.notice:
        lines.append(run.precision.notice)
    elif run.precision.enabled:
        scaling = "dynamic loss scaling" if run.precision.needs_loss_scaling else "no loss scaling"
        lines.append(f"mixed precision: {run.precision.dtype} autocast {run.precision.level}, "
                     f"{scaling}")
    for line in lines:
        if line:
            logger.info(line)


def write_config_snapshot(args, output_dir):
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "args.json"), "w") as f:
            json.dump(to_plain(vars(args)), f, indent=1, default=str)


__all__ = ["PretrainRun", "NonFiniteLossError", "describe_start", "write_config_snapshot"]
