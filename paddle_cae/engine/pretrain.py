"""Pretraining, written once for every pretraining model.

A pretraining model takes a batch dict and returns ``{"loss": total, <parts>...}``. The
batch the engine builds holds, when the data pipeline made them:

    images [B, 3, H, W]          bool_masked_pos [B, N]     tokenizer_images [B, 3, h, w]
    noise [B, N] (MAE masking)   order [B, N] (BootMAE)     epoch (int)
    batch_seed (int, the same on every rank for one global batch)

Models declare optional hooks instead of the engine knowing them:
``on_epoch_start(epoch)``, ``after_optimizer_step()`` (BootMAE's EMA teacher),
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

from ..data.loader import Loader, SeededSamples, _WorkerSeeder, collate_samples, derive_seed
from ..data.sampler import GlobalBatchSampler
from ..optim import apply_lr, cosine_scheduler, mae_lr_at
from ..runtime import distributed as dist_rt
from ..runtime.checkpoint import load_checkpoint, save_checkpoint, to_plain
from ..runtime.logging import JsonLinesLog, MetricLogger, SmoothedValue, VisualDLWriter
from ..runtime.resume import (find_resume_checkpoint, rng_state, save_training_checkpoint,
                              set_rng_state)
from .stepper import NonFiniteLossError, Stepper

logger = logging.getLogger("paddle_cae")

# what the data pipeline may produce for a pretraining model (labels are not used)
BATCH_KEYS = ("images", "bool_masked_pos", "tokenizer_images", "noise", "order", "target_ids")


def unwrap(model):
    return model._layers if isinstance(model, paddle.DataParallel) else model


def build_pretrain_loader(dataset, args, env):
    sampler = GlobalBatchSampler(len(dataset), args.batch_size, env.world_size, env.rank,
                                 shuffle=True, drop_last=True, seed=args.seed)
    seeded = SeededSamples(dataset, seed=args.seed)
    seeder = _WorkerSeeder(args.seed, env.rank)
    workers = int(args.num_workers)
    data_loader = paddle.io.DataLoader(
        seeded, batch_sampler=sampler, num_workers=workers, collate_fn=collate_samples,
        use_shared_memory=workers > 0, worker_init_fn=seeder if workers > 0 else None)
    return Loader(dataset, sampler, seeded, seeder, data_loader)


def set_loader_epoch(loader, epoch, start_batch=0):
    loader.set_epoch(epoch)
    loader.batch_sampler.set_epoch(epoch, start_batch)


class LearningRateSchedule:
    """Per-update learning rate and weight decay.

    ``mae``: half-cycle cosine at a fractional epoch (MAE). ``beit``: the per-iteration
    ``cosine_scheduler`` array of BEiT/CAE/BootMAE, with an optional cosine weight decay."""

    def __init__(self, kind, lr, min_lr, warmup_epochs, epochs, updates_per_epoch,
                 weight_decay, weight_decay_end=None, warmup_steps=-1):
        self.kind = kind
        self.lr, self.min_lr = lr, min_lr
        self.warmup_epochs, self.epochs = warmup_epochs, epochs
        self.updates_per_epoch = updates_per_epoch
        self.weight_decay = weight_decay
        self.weight_decay_end = weight_decay_end
        if kind == "beit":
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
        if self.kind == "mae":
            lr = mae_lr_at(epoch + update_in_epoch / self.updates_per_epoch, self.lr, self.min_lr,
                           self.warmup_epochs, self.epochs)
        else:
            lr = float(self.lr_values[min(index, len(self.lr_values) - 1)])
        wd = None
        if self.wd_values is not None:
            wd = float(self.wd_values[min(index, len(self.wd_values) - 1)])
        return lr, wd


def model_batch(batch, epoch, batch_seed):
    out = {k: v for k, v in batch.items() if k in BATCH_KEYS}
    out["epoch"] = epoch
    out["batch_seed"] = batch_seed
    return out


def scalar_parts(outputs):
    """The 0-d entries of a model's output dict, as python floats, by name."""
    parts = {}
    for name, value in outputs.items():
        if isinstance(value, paddle.Tensor) and value.size == 1:
            parts[name] = float(value.item())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            parts[name] = float(value)
    return parts


class PretrainRun:
    """Holds everything one pretraining run needs; ``fit()`` trains to the last epoch."""

    def __init__(self, args, model, dataset, optimizer, precision, env, output_dir=None,
                 log_dir=None):
        self.args = args
        self.env = env
        self.model_core = model
        self.model = paddle.DataParallel(model) if env.distributed else model
        self.dataset = dataset
        self.optimizer = optimizer
        self.precision = precision
        self.output_dir = output_dir
        self.exp_name = getattr(args, "exp_name", "") or None
        self.loader = build_pretrain_loader(dataset, args, env)
        self.accum_iter = int(args.accum_iter)
        batches = self.loader.batch_sampler.batches_per_epoch()
        if getattr(args, "max_train_step", None):
            batches = min(batches, int(args.max_train_step))
        self.batches_per_epoch = batches - batches % self.accum_iter
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"an epoch has {batches} batch(es), fewer than --accum_iter {self.accum_iter}")
        self.updates_per_epoch = self.batches_per_epoch // self.accum_iter
        self.schedule = LearningRateSchedule(
            args.lr_schedule, args.abs_lr, args.min_lr, args.warmup_epochs, args.epochs,
            self.updates_per_epoch, args.weight_decay, getattr(args, "weight_decay_end", None),
            getattr(args, "warmup_steps", -1))
        self.stepper = Stepper(self.model, optimizer, precision, self.accum_iter,
                               getattr(args, "clip_grad", None))
        self.start_epoch = int(getattr(args, "start_epoch", 0) or 0)
        self.start_batch = 0
        self.global_step = 0
        self.last_good_checkpoint = None
        self.writer = VisualDLWriter(log_dir, enabled=env.is_main)
        self.json_log = JsonLinesLog(
            os.path.join(output_dir, "log.txt") if output_dir else None, enabled=env.is_main)
        self.vis_freq = int(getattr(args, "vis_freq", 0) or 0)
        self.save_latest_freq = int(getattr(args, "save_latest_freq", 0) or 0)

    # -------------------------------------------------------------- checkpoints
    def training_state(self, epoch, batches_done):
        core = self.model_core
        state = {
            "kind": "pretrain",
            "model_name": self.args.model,
            "model": {k: v.numpy() for k, v in core.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "epoch": int(epoch),
            "batches_done": batches_done,
            "global_step": int(self.global_step),
            "scaler": self.stepper.state_dict(),
            "args": to_plain(vars(self.args)),
            "rng": rng_state(),
        }
        if hasattr(core, "extra_state"):
            state["extra"] = core.extra_state()
        return state

    def save(self, epoch, batches_done, numbered):
        if not self.output_dir or not self.env.is_main:
            return
        state = self.training_state(epoch, batches_done)
        path = save_training_checkpoint(state, self.output_dir, "latest", self.exp_name)
        self.last_good_checkpoint = path
        if numbered:
            path = save_training_checkpoint(state, self.output_dir, epoch, self.exp_name)
            self.last_good_checkpoint = path
        logger.info("saved %s", path)

    def restore(self, state, path):
        core = self.model_core
        missing, unexpected = _load_model_state(core, state["model"])
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not fit model {self.args.model}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.optimizer.set_state_dict(state["optimizer"])
        self.stepper.load_state_dict(state.get("scaler"))
        if "extra" in state and hasattr(core, "load_extra_state"):
            core.load_extra_state(state["extra"])
        set_rng_state(state.get("rng"))
        self.global_step = int(state.get("global_step", 0))
        done = state.get("batches_done")
        if done is None:
            self.start_epoch, self.start_batch = int(state["epoch"]) + 1, 0
        else:
            self.start_epoch, self.start_batch = int(state["epoch"]), int(done)
        self.last_good_checkpoint = path
        where = (f"epoch {self.start_epoch}" if not self.start_batch
                 else f"epoch {self.start_epoch}, batch {self.start_batch}")
        logger.info("resumed from %s: continuing at %s", path, where)

    def maybe_resume(self):
        args = self.args
        path, state = None, None
        if getattr(args, "resume", ""):
            path = args.resume
            state = load_checkpoint(path)
        elif getattr(args, "auto_resume", False) and self.output_dir:
            path, state = find_resume_checkpoint(self.output_dir, self.exp_name)
        if state is not None:
            self.restore(state, path)

    # -------------------------------------------------------------------- train
    def fit(self):
        args = self.args
        self.maybe_resume()
        for epoch in range(self.start_epoch, args.epochs):
            start_batch = self.start_batch if epoch == self.start_epoch else 0
            stats = self.train_one_epoch(epoch, start_batch)
            last = epoch + 1 == args.epochs
            numbered = last or (args.save_ckpt_freq and (epoch + 1) % args.save_ckpt_freq == 0)
            self.save(epoch, None, numbered)
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
        set_loader_epoch(self.loader, epoch, start_batch)
        if hasattr(core, "on_epoch_start"):
            core.on_epoch_start(epoch)
        metrics = MetricLogger()
        metrics.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.3e}"))
        header = f"Epoch: [{epoch}]"
        total = self.batches_per_epoch
        global_batch = args.batch_size * self.env.world_size
        iterator = metrics.log_every(self._limited(self.loader, total - start_batch),
                                     args.print_freq, header, total=total,
                                     start_index=start_batch, batch_size=global_batch)
        for i, batch in enumerate(iterator, start=start_batch):
            if i % self.accum_iter == 0:
                lr, wd = self.schedule.at(epoch, i // self.accum_iter)
                apply_lr(self.optimizer, lr, wd)
            batch_seed = derive_seed(args.seed, epoch, i)
            paddle.seed(derive_seed(args.seed, epoch, i, self.env.rank))
            inputs = model_batch(batch, epoch, batch_seed)
            with self.stepper.autocast():
                outputs = model(inputs)
            try:
                info = self.stepper.backward(outputs["loss"], i)
            except NonFiniteLossError as err:
                raise NonFiniteLossError(self._nan_message(epoch, i, err)) from None
            if info["stepped"]:
                self.global_step += 1
                if hasattr(core, "after_optimizer_step"):
                    core.after_optimizer_step()
            parts = scalar_parts(outputs)
            scale = info["loss_scale"] if self.stepper.scaler.enabled else None
            metrics.update(**parts, lr=self.optimizer.get_lr(), loss_scale=scale,
                           grad_norm=info["grad_norm"])
            if info["stepped"]:
                self._log_step(parts, info, epoch, i)
                update = i // self.accum_iter + 1
                if self.save_latest_freq and update % self.save_latest_freq == 0 \
                        and i + 1 < total:
                    self.save(epoch, i + 1, numbered=False)
            if self.vis_freq and self.writer.enabled and i % self.vis_freq == 0 \
                    and hasattr(core, "reconstruction_image"):
                image = core.reconstruction_image(inputs, outputs)
                if image is not None:
                    self.writer.add_image("reconstruction", image, self._x_step(epoch, i))
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
    def _limited(self, loader, count):
        for k, batch in enumerate(loader):
            if k >= count:
                break
            yield batch

    def _x_step(self, epoch, i):
        """VisualDL x axis: images seen, in units of 1000 (as the official logs)."""
        return int((epoch * self.batches_per_epoch + i) * self.args.batch_size
                   * self.env.world_size / 1000)

    def _log_step(self, parts, info, epoch, i):
        if not self.writer.enabled or (i // self.accum_iter) % max(self.args.print_freq, 1):
            return
        step = self._x_step(epoch, i)
        self.writer.add_scalars("train", parts, step)
        self.writer.add_scalar("opt/lr", self.optimizer.get_lr(), step)
        self.writer.add_scalar("opt/loss_scale", info["loss_scale"], step)
        if info["grad_norm"] is not None:
            self.writer.add_scalar("opt/grad_norm", info["grad_norm"], step)

    def _nan_message(self, epoch, i, err):
        where = self.last_good_checkpoint or "none saved yet"
        hint = ("lower the learning rate or add --clip_grad" if not self.precision.enabled
                else "try --amp false or a lower learning rate")
        return (f"stopping: non-finite loss at epoch {epoch}, batch {i} ({err}); last good "
                f"checkpoint: {where}; {hint}")

    def export_encoder(self):
        core = self.model_core
        if not hasattr(core, "encoder_state_dict"):
            return None
        path = os.path.join(self.output_dir,
                            f"{self.exp_name + '_' if self.exp_name else ''}encoder.pd")
        state = {"kind": "encoder", "model_name": self.args.model,
                 "model": {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v)
                           for k, v in core.encoder_state_dict().items()},
                 "args": to_plain(vars(self.args))}
        save_checkpoint(state, path)
        logger.info("encoder weights for fine-tuning: %s", path)
        return path


def _load_model_state(model, state):
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    model.set_state_dict({k: v for k, v in state.items() if k in own})
    return missing, unexpected


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
        lines.append(f"mixed precision: {run.precision.dtype} autocast {run.precision.level}, "
                     "dynamic loss scaling" if run.precision.needs_loss_scaling else "")
    for line in lines:
        if line:
            logger.info(line)


def write_config_snapshot(args, output_dir):
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "args.json"), "w") as f:
            json.dump(to_plain(vars(args)), f, indent=1, default=str)


__all__ = ["PretrainRun", "LearningRateSchedule", "NonFiniteLossError", "build_pretrain_loader",
           "describe_start", "write_config_snapshot"]
