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
from ..models.common import ema_update_
from ..runtime import distributed as dist_rt
from ..runtime.checkpoint import save_checkpoint, to_plain
from ..runtime.logging import MetricLogger, SmoothedValue
from ..runtime.resume import checkpoint_path, checkpoint_prefix, save_training_checkpoint
from .evaluate import evaluate
from .losses import label_smoothing_cross_entropy, soft_target_cross_entropy
from .run import TrainingRun
from .scalars import DeferredScalars, update_metrics
from .stepper import NonFiniteLossError

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

    def update(self, model):
        ema_update_(self.state, model, self.decay)

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


# ------------------------------------------------------------------------------------ run
class ClassifierRun(TrainingRun):
    """Everything one fine-tune / probe run needs; ``fit()`` trains to the last epoch."""

    def __init__(self, args, model, config, train_set, val_loader, optimizer, precision, env,
                 loss_fn, kind="finetune", ema_decay=None, train_mode_fn=None):
        super().__init__(args, model, train_set, optimizer, precision, env)
        self.kind = kind
        self.config = config
        self.val_loader = val_loader
        self.loss_fn = loss_fn
        self.class_names = list(getattr(train_set, "class_names", []) or [])
        self.train_mode_fn = train_mode_fn or (lambda m: m.train())
        self.ema = ModelEma(model, ema_decay) if ema_decay else None
        self.best_acc1 = None
        self.last_metrics = {}

    # ------------------------------------------------------------------ checkpoints
    def extra_state(self):
        return to_plain({
            "model_name": self.config["model"],
            "classifier": dict(self.config),
            "model_ema": self.ema.numpy_state() if self.ema else None,
            "class_names": self.class_names,
            "best_acc1": self.best_acc1,
            "metrics": dict(self.last_metrics),
        })

    def restore_extra(self, state):
        if self.ema is not None and state.get("model_ema"):
            self.ema.load(state["model_ema"])
        self.best_acc1 = state.get("best_acc1")

    def best_path(self):
        return os.path.join(self.output_dir, f"{checkpoint_prefix(self.exp_name)}checkpoint-best.pd")

    def save(self, epoch, numbered, best):
        if not self.output_dir:
            return
        tags = ["latest"] + ([epoch] if numbered else [])
        for tag in tags:  # every rank knows what was written, for a non-finite stop's message
            self.loss_trend.checkpoint(checkpoint_path(self.output_dir, tag, self.exp_name))
        if not self.env.is_main:
            return
        state = self.training_state(epoch, None)
        for tag in tags:
            save_training_checkpoint(state, self.output_dir, tag, self.exp_name)
        if best:
            save_checkpoint(state, self.best_path())
            logger.info("new best top-1 %.2f%%: saved %s", self.best_acc1, self.best_path())

    # ------------------------------------------------------------------------ train
    def fit(self):
        for epoch, start_batch in self.epochs_to_run():
            train_stats = self.train_one_epoch(epoch, start_batch)
            test_stats = self.evaluate()
            improved = self.best_acc1 is None or test_stats["acc1"] > self.best_acc1
            if improved:
                self.best_acc1 = test_stats["acc1"]
            logger.info("Accuracy of the network on the %d test images: top-1 %.2f%% top-5 %.2f%% "
                        "(best top-1 %.2f%%)", test_stats["images"], test_stats["acc1"],
                        test_stats["acc5"], self.best_acc1)
            self.last_metrics = {f"test_{k}": v for k, v in test_stats.items()}
            self.save(epoch, self.keeps_numbered_checkpoint(epoch), improved)
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
        batches = self.epoch_batches(epoch, start_batch)
        metrics = MetricLogger()
        metrics.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.3e}"))
        total = self.batches_per_epoch
        iterator = metrics.log_every(batches, args.print_freq,
                                     f"Epoch: [{epoch}]", total=total, start_index=start_batch,
                                     batch_size=args.batch_size * self.env.world_size)
        scalars = DeferredScalars(args.print_freq)
        for i, batch in enumerate(iterator, start=start_batch):
            self.begin_batch(epoch, i)
            rng = np.random.RandomState(derive_seed(args.seed, epoch, i, 7))
            images, targets = self.loss_fn.mix(batch["images"], batch["labels"], rng)
            with self.stepper.autocast(i):  # no_sync for the forward too, see engine/stepper.py
                logits = self.model(images)
            loss = self.loss_fn(logits, targets)
            # the logged loss of the last interval, read now that this step is queued
            self._read_scalars(metrics, scalars.read_queued(), epoch, i)
            try:
                info = self.stepper.backward(loss, i)
            except NonFiniteLossError as err:
                self._read_scalars(metrics, scalars.flush(), epoch, i)
                raise NonFiniteLossError(self.loss_trend.stop_message(
                    f"epoch {epoch}, batch {i}", err, self.precision.enabled)) from None
            if info["stepped"]:
                self.global_step += 1
                if self.ema is not None:
                    self.ema.update(self.model_core)
            scalars.add({"loss": loss})
            metrics.update(lr=self.optimizer.get_lr())
        self._read_scalars(metrics, scalars.flush(), epoch, total)
        averages = dist_rt.all_reduce_mean(metrics.averages())
        logger.info("Epoch %d averaged stats: %s", epoch,
                    "  ".join(f"{k}: {v:.4g}" for k, v in averages.items()))
        return averages


    def _read_scalars(self, metrics, means, epoch, i):
        """A finished interval's mean loss into the progress meters, the loss trend and
        VisualDL."""
        if not means:
            return
        update_metrics(metrics, means)
        self.loss_trend.reading(f"epoch {epoch}, batch {i}", means["loss"][0])
        if self.writer.enabled:
            self.writer.add_scalar("train/loss", means["loss"][0], self.global_step)
            self.writer.add_scalar("opt/lr", self.optimizer.get_lr(), self.global_step)


__all__ = ["ClassificationLoss", "ClassifierRun", "ModelEma", "checkpoint_path"]
