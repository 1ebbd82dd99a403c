"""Supervised training of a classifier with evaluation after every epoch: fine-tuning and (with
a frozen encoder) linear probing share this loop.

Per epoch: per-update learning rate (MAE or BEiT schedule, layer-wise scales in the groups),
the loss of a batch (Mixup/CutMix soft targets or label smoothing), one optimizer update per
``accum_iter`` batches through the shared :class:`Stepper`, an optional weight EMA, then top-1 /
top-5 on the whole validation set (each image once, also with ``--dist_eval``).

Checkpoints (atomic, rank 0): ``checkpoint-latest.pd`` every epoch (auto-resume picks it up),
``checkpoint-best.pd`` when top-1 improves, ``checkpoint-<epoch>.pd`` every ``save_ckpt_freq``
epochs and at the end. Each holds ``{"kind", "model_name", "classifier" (the config to rebuild
the network), "model", "model_ema", "optimizer", "epoch", "batches_done", "global_step",
"scaler", "args", "rng", "class_names", "best_acc1", "metrics"}``.
"""
import logging
import os

import numpy as np
import paddle
import paddle.nn.functional as F

from ..data.loader import derive_seed
from ..data.mixup import Mixup
from ..optim import apply_lr
from ..runtime import distributed as dist_rt
from ..runtime.checkpoint import load_checkpoint, save_checkpoint, to_plain
from ..runtime.logging import JsonLinesLog, MetricLogger, SmoothedValue, VisualDLWriter
from ..runtime.resume import (checkpoint_path, checkpoint_prefix, find_resume_checkpoint,
                              rng_state, save_training_checkpoint, set_rng_state)
from .evaluate import evaluate
from .losses import label_smoothing_cross_entropy, soft_target_cross_entropy
from .pretrain import LearningRateSchedule, build_pretrain_loader, set_loader_epoch
from .stepper import NonFiniteLossError, Stepper

logger = logging.getLogger("paddle_cae")


# ------------------------------------------------------------------------------- objective
class ClassificationLoss:
    """logits + integer labels -> loss, with the batch mixed first when Mixup/CutMix is on."""

    def __init__(self, num_classes, smoothing=0.0, mixup=0.0, cutmix=0.0, mixup_prob=1.0,
                 switch_prob=0.5):
        self.smoothing = float(smoothing)
        self.mixup = None
        if (mixup > 0 or cutmix > 0) and mixup_prob > 0:
            self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob,
                               switch_prob=switch_prob, label_smoothing=self.smoothing,
                               num_classes=num_classes)

    def mix(self, images, labels, rng):
        """(images, targets): soft targets when mixing, else the labels."""
        if self.mixup is None:
            return images, labels
        self.mixup.rng = rng
        return self.mixup(images, labels)

    def __call__(self, logits, targets):
        if self.mixup is not None:
            return soft_target_cross_entropy(logits, targets)
        if self.smoothing > 0:
            return label_smoothing_cross_entropy(logits, targets, self.smoothing)
        return F.cross_entropy(logits.astype("float32"), targets.reshape([-1, 1]).astype("int64"))

    def __repr__(self):
        return f"ClassificationLoss(smoothing={self.smoothing}, mixup={self.mixup!r})"


class ModelEma:
    """Exponential moving average of a model's floating-point state (weights and buffers):
    ``ema <- decay * ema + (1 - decay) * current`` after every optimizer update."""

    def __init__(self, model, decay=0.9999):
        self.decay = float(decay)
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @paddle.no_grad()
    def update(self, model):
        for key, value in model.state_dict().items():
            ema = self.state[key]
            if paddle.is_floating_point(value):
                ema.set_value(ema * self.decay + value.detach() * (1.0 - self.decay))
            else:
                ema.set_value(value)

    def numpy_state(self):
        return {k: v.numpy() for k, v in self.state.items()}

    def load(self, state):
        for key, value in state.items():
            if key in self.state:
                self.state[key].set_value(paddle.to_tensor(np.asarray(value)))

    def swapped_into(self, model):
        """Context manager: the model holds the EMA weights inside the block."""
        return _Swap(model, self.state)


class _Swap:
    def __init__(self, model, state):
        self.model, self.state = model, state

    def __enter__(self):
        self.saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.set_state_dict(self.state)
        return self.model

    def __exit__(self, *exc):
        self.model.set_state_dict(self.saved)
        return False


def strict_load(model, state, source):
    """Load a checkpoint of this package into the exact same network; one-line error otherwise."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(np.shape(state[k])) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: {list(np.shape(state[k]))} in the "
                         f"file, {list(own[k].shape)} in the model)")
        raise ValueError(f"{source} does not fit this model: {'; '.join(parts)}")
    model.set_state_dict({k: state[k] for k in own})


# ------------------------------------------------------------------------------------ run
class ClassifierRun:
    """Everything one fine-tune / probe run needs; ``fit()`` trains to the last epoch."""

    def __init__(self, args, model, config, train_set, val_loader, optimizer, precision, env,
                 loss_fn, kind="finetune", ema_decay=None, train_mode_fn=None):
        self.args = args
        self.env = env
        self.kind = kind
        self.config = config
        self.model_core = model
        self.model = paddle.DataParallel(model) if env.distributed else model
        self.train_set = train_set
        self.val_loader = val_loader
        self.optimizer = optimizer
        self.precision = precision
        self.loss_fn = loss_fn
        self.class_names = list(getattr(train_set, "class_names", []) or [])
        self.output_dir = args.output_dir or None
        self.exp_name = getattr(args, "exp_name", "") or None
        self.train_mode_fn = train_mode_fn or (lambda m: m.train())
        self.loader = build_pretrain_loader(train_set, args, env)
        self.accum_iter = int(args.accum_iter)
        batches = self.loader.batch_sampler.batches_per_epoch()
        if getattr(args, "max_train_step", None):
            batches = min(batches, int(args.max_train_step))
        self.batches_per_epoch = batches - batches % self.accum_iter
        if self.batches_per_epoch == 0:
            raise ValueError(f"an epoch has {batches} batch(es), fewer than --accum_iter {self.accum_iter}")
        self.updates_per_epoch = self.batches_per_epoch // self.accum_iter
        self.schedule = LearningRateSchedule(
            args.lr_schedule, args.abs_lr, args.min_lr, args.warmup_epochs, args.epochs,
            self.updates_per_epoch, args.weight_decay, getattr(args, "weight_decay_end", None),
            getattr(args, "warmup_steps", -1))
        self.stepper = Stepper(self.model, optimizer, precision, self.accum_iter,
                               getattr(args, "clip_grad", None))
        self.ema = ModelEma(model, ema_decay) if ema_decay else None
        self.start_epoch, self.start_batch = int(getattr(args, "start_epoch", 0) or 0), 0
        self.global_step = 0
        self.best_acc1 = None
        self.last_metrics = {}
        self.writer = VisualDLWriter(args.log_dir, enabled=env.is_main and bool(self.output_dir))
        self.json_log = JsonLinesLog(os.path.join(self.output_dir, "log.txt") if self.output_dir else None,
                                     enabled=env.is_main)

    # ------------------------------------------------------------------ checkpoints
    def training_state(self, epoch, batches_done):
        state = {
            "kind": self.kind,
            "model_name": self.config["model"],
            "classifier": dict(self.config),
            "model": {k: v.numpy() for k, v in self.model_core.state_dict().items()},
            "model_ema": self.ema.numpy_state() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "epoch": int(epoch),
            "batches_done": batches_done,
            "global_step": int(self.global_step),
            "scaler": self.stepper.state_dict(),
            "args": to_plain(vars(self.args)),
            "rng": rng_state(),
            "class_names": self.class_names,
            "best_acc1": self.best_acc1,
            "metrics": dict(self.last_metrics),
        }
        return to_plain(state)

    def best_path(self):
        return os.path.join(self.output_dir, f"{checkpoint_prefix(self.exp_name)}checkpoint-best.pd")

    def save(self, epoch, numbered, best):
        if not self.output_dir or not self.env.is_main:
            return
        state = self.training_state(epoch, None)
        save_training_checkpoint(state, self.output_dir, "latest", self.exp_name)
        if numbered:
            save_training_checkpoint(state, self.output_dir, epoch, self.exp_name)
        if best:
            save_checkpoint(state, self.best_path())
            logger.info("new best top-1 %.2f%%: saved %s", self.best_acc1, self.best_path())

    def restore(self, state, path):
        strict_load(self.model_core, state["model"], path)
        self.optimizer.set_state_dict(state["optimizer"])
        self.stepper.load_state_dict(state.get("scaler"))
        if self.ema is not None and state.get("model_ema"):
            self.ema.load(state["model_ema"])
        set_rng_state(state.get("rng"))
        self.global_step = int(state.get("global_step", 0))
        self.best_acc1 = state.get("best_acc1")
        done = state.get("batches_done")
        self.start_epoch, self.start_batch = ((int(state["epoch"]) + 1, 0) if done is None
                                              else (int(state["epoch"]), int(done)))
        logger.info("resumed from %s: continuing at epoch %d", path, self.start_epoch)

    def maybe_resume(self):
        path, state = None, None
        if getattr(self.args, "resume", ""):
            path = self.args.resume
            state = load_checkpoint(path)
            if not isinstance(state, dict) or "optimizer" not in state or "model" not in state:
                raise ValueError(f"--resume {path}: not a training checkpoint of this package "
                                 "(use --finetune for pretrained or official weights)")
        elif getattr(self.args, "auto_resume", False) and self.output_dir:
            path, state = find_resume_checkpoint(self.output_dir, self.exp_name)
        if state is not None:
            self.restore(state, path)
        return path

    # ------------------------------------------------------------------------ train
    def fit(self):
        args = self.args
        self.maybe_resume()
        for epoch in range(self.start_epoch, args.epochs):
            start = self.start_batch if epoch == self.start_epoch else 0
            train_stats = self.train_one_epoch(epoch, start)
            test_stats = self.evaluate()
            improved = self.best_acc1 is None or test_stats["acc1"] > self.best_acc1
            if improved:
                self.best_acc1 = test_stats["acc1"]
            logger.info("Accuracy of the network on the %d test images: top-1 %.2f%% top-5 %.2f%% "
                        "(best top-1 %.2f%%)", test_stats["images"], test_stats["acc1"],
                        test_stats["acc5"], self.best_acc1)
            self.last_metrics = {f"test_{k}": v for k, v in test_stats.items()}
            last = epoch + 1 == args.epochs
            numbered = last or bool(args.save_ckpt_freq and (epoch + 1) % args.save_ckpt_freq == 0)
            self.save(epoch, numbered, improved)
            record = {**{f"train_{k}": v for k, v in train_stats.items()}, **self.last_metrics,
                      "epoch": epoch, "best_acc1": self.best_acc1}
            self.json_log.write(record)
            self.writer.add_scalars("test", {k: test_stats[k] for k in ("acc1", "acc5", "loss")}, epoch)
        self.writer.close()
        return self

    def evaluate(self):
        stats = evaluate(self.model_core, self.val_loader, self.precision, self.args.print_freq)
        if self.ema is not None:
            with self.ema.swapped_into(self.model_core) as ema_model:
                ema_stats = evaluate(ema_model, self.val_loader, self.precision, self.args.print_freq,
                                     header="Test (EMA):")
            logger.info("EMA weights: top-1 %.2f%% top-5 %.2f%%", ema_stats["acc1"], ema_stats["acc5"])
            stats.update({f"ema_{k}": v for k, v in ema_stats.items() if k != "images"})
        return stats

    def train_one_epoch(self, epoch, start_batch=0):
        args = self.args
        self.train_mode_fn(self.model)
        set_loader_epoch(self.loader, epoch, start_batch)
        metrics = MetricLogger()
        metrics.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.3e}"))
        total = self.batches_per_epoch
        iterator = metrics.log_every(_limited(self.loader, total - start_batch), args.print_freq,
                                     f"Epoch: [{epoch}]", total=total, start_index=start_batch,
                                     batch_size=args.batch_size * self.env.world_size)
        for i, batch in enumerate(iterator, start=start_batch):
            if i % self.accum_iter == 0:
                lr, wd = self.schedule.at(epoch, i // self.accum_iter)
                apply_lr(self.optimizer, lr, wd)
            paddle.seed(derive_seed(args.seed, epoch, i, self.env.rank))
            rng = np.random.RandomState(derive_seed(args.seed, epoch, i, 7))
            images, targets = self.loss_fn.mix(batch["images"], batch["labels"], rng)
            with self.stepper.autocast():
                logits = self.model(images)
            loss = self.loss_fn(logits, targets)
            try:
                info = self.stepper.backward(loss, i)
            except NonFiniteLossError as err:
                raise NonFiniteLossError(f"stopping: non-finite loss at epoch {epoch}, batch {i} "
                                         f"({err}); lower the learning rate") from None
            if info["stepped"]:
                self.global_step += 1
                if self.ema is not None:
                    self.ema.update(self.model_core)
            metrics.update(loss=float(loss.item()), lr=self.optimizer.get_lr())
            if info["stepped"] and self.writer.enabled and self.global_step % max(args.print_freq, 1) == 0:
                self.writer.add_scalar("train/loss", float(loss.item()), self.global_step)
                self.writer.add_scalar("opt/lr", self.optimizer.get_lr(), self.global_step)
        averages = dist_rt.all_reduce_mean(metrics.averages())
        logger.info("Epoch %d averaged stats: %s", epoch,
                    "  ".join(f"{k}: {v:.4g}" for k, v in averages.items()))
        return averages


def _limited(loader, count):
    for k, batch in enumerate(loader):
        if k >= count:
            break
        yield batch


__all__ = ["ClassificationLoss", "ClassifierRun", "ModelEma", "checkpoint_path", "strict_load"]
