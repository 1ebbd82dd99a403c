"""The segmentation training loop, iteration-based as the official mmseg runs are.

Per iteration: the poly learning rate (times each group's layer-decay scale), a batch of crops,
forward under autocast, loss = cross-entropy of the main head + ``aux_weight`` x that of the
auxiliary head (each averaged over all pixels of the batch, ignored ones counting 0, as mmseg
0.11 does), one update through the shared :class:`~paddle_cae.engine.stepper.Stepper`.
Every ``eval_interval`` iterations and at the end: sliding-window evaluation of the whole
validation split (split over the processes; areas summed), mIoU / mAcc / aAcc, a JSON line with
``mIoU`` in ``log.txt``, VisualDL scalars and a few predicted masks.

Checkpoints (atomic, rank 0, runtime/resume's names): ``checkpoint-latest.pd`` and
``checkpoint-<iteration>.pd`` every ``save_interval`` iterations and at the end,
``checkpoint-best.pd`` when mIoU improves. Each holds ``{"kind": "segment", "model_name",
"segmentor" (the config to rebuild the network), "model", "optimizer", "epoch": 0,
"batches_done" (= iterations done), "iteration", "global_step", "scaler", "args", "rng",
"best_mIoU", "metrics"}``; auto-resume continues from the newest one of this kind and model.
"""
import logging
import os
import time

import numpy as np
import paddle
import paddle.nn.functional as F

from ..data.loader import derive_seed
from ..engine.run import TrainingRun, build_train_loader, limited
from ..engine.stepper import NonFiniteLossError, Stepper
from ..loading.pretrained import strict_load
from ..optim import apply_lr
from ..runtime import distributed as dist_rt
from ..runtime.checkpoint import load_checkpoint, save_checkpoint, to_plain
from ..runtime.collectives import broadcast_object
from ..runtime.logging import JsonLinesLog, VisualDLWriter
from ..runtime.resume import (checkpoint_prefix, describe_identity, identity_matches,
                              remove_stale_temporaries, rng_state, save_training_checkpoint,
                              scan_output_dir, set_rng_state)
from .inference import colour_mask, predict_mask
from .metrics import SegmentationMeter
from .optim import poly_lr
from .seg_data import EvalTransform, reduce_zero_label

logger = logging.getLogger("paddle_cae")
KIND = "segment"
IGNORE_INDEX = 255


def pixel_cross_entropy(logits, labels):
    """Mean over all pixels of the per-pixel cross-entropy; pixels labelled 255 count 0."""
    loss = F.cross_entropy(logits.astype("float32"), labels.unsqueeze(1), ignore_index=IGNORE_INDEX,
                           reduction="none", axis=1)  # [B, 1, H, W]
    return loss.mean()


def segmentation_loss(logits, labels, aux_weight):
    """(total, {"decode": .., "aux": ..}) for the head outputs ``logits`` (main first)."""
    parts = {"decode": pixel_cross_entropy(logits[0], labels)}
    total = parts["decode"]
    if len(logits) > 1 and aux_weight:
        parts["aux"] = pixel_cross_entropy(logits[1], labels)
        total = total + aux_weight * parts["aux"]
    return total, parts


def all_reduce_areas(areas):
    """Sum the meters' [3, classes] areas over the processes (int64: exact pixel counts)."""
    if not dist_rt.get_env().distributed:
        return areas
    import paddle.distributed as dist

    t = paddle.to_tensor(np.rint(areas).astype("int64"))
    dist.all_reduce(t)
    return t.numpy().astype(np.float64)


def evaluate_segmentation(model, dataset, config, precision=None, env=None, vis_count=0):
    """Sliding-window evaluation of ``dataset`` (raw items); every process takes every
    world_size-th image. Returns (metrics dict, [(name, image, predicted colour, label colour)]
    of the first ``vis_count`` images of this process)."""
    env = env or dist_rt.get_env()
    transform = EvalTransform(config["img_scale"], config["mean"], config["std"])
    meter = SegmentationMeter(config["num_classes"])
    shown = []
    was_training = model.training
    model.eval()
    start = time.time()
    count = 0
    for index in range(env.rank, len(dataset), env.world_size):
        image, label = dataset.raw(index)
        target = reduce_zero_label(label)
        pred = predict_mask(model, transform.image(image), config["num_classes"],
                            config["crop_size"], config["stride"], target.shape, precision)
        meter.update(pred, target)
        count += 1
        if len(shown) < vis_count:
            shown.append((dataset.name(index), image, colour_mask(pred, config["num_classes"]),
                          colour_mask(target, config["num_classes"])))
    meter.intersect, meter.area_pred, meter.area_label = all_reduce_areas(meter.areas())
    if was_training:
        model.train()
    stats = meter.summary()
    stats["images"] = len(dataset)
    stats["eval_seconds"] = round(time.time() - start, 2)
    return stats, shown


class SegmentationRun:
    """One training run; ``fit()`` trains to ``--iters``."""

    kind = KIND

    def __init__(self, args, model, config, train_set, val_set, optimizer, precision, env):
        self.args = args
        self.env = env
        self.config = config
        self.model_core = model
        self.model = dist_rt.data_parallel(model, env)
        self.train_set = train_set
        self.val_set = val_set
        self.optimizer = optimizer
        self.precision = precision
        self.output_dir = args.output_dir or None
        self.exp_name = args.exp_name or None
        self.loader = build_train_loader(train_set, args, env)
        self.batches_per_pass = self.loader.batch_sampler.batches_per_epoch()
        if self.batches_per_pass == 0:
            raise ValueError(f"{train_set.root}: {len(train_set)} training images are fewer than one "
                             f"global batch ({args.batch_size} x {env.world_size})")
        self.stepper = Stepper(self.model, optimizer, precision, 1, args.clip_grad)
        self.iteration = 0
        self.best_miou = None
        self.last_metrics = {}
        self.check_output_dir()
        self.writer = VisualDLWriter(None, enabled=False)  # opened once the run has started
        self.json_log = JsonLinesLog(None, enabled=False)
        self.config_text = None  # the resolved flags, written to <output_dir>/config.yaml at start

    def open_logs(self):
        """Nothing is written before the run has really started (data checked, resume decided)."""
        args, env = self.args, self.env
        if env.is_main and self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            if self.config_text:
                with open(os.path.join(self.output_dir, "config.yaml"), "w") as f:
                    f.write(self.config_text)
        self.writer = VisualDLWriter(args.log_dir, enabled=env.is_main and bool(self.output_dir))
        self.json_log = JsonLinesLog(os.path.join(self.output_dir, "log.txt") if self.output_dir
                                     else None, enabled=env.is_main)

    # ---------------------------------------------------------------- checkpoints
    # refuse an --output_dir holding checkpoints of another kind or model (one line, every rank):
    # the same rule as every training run's (it reads output_dir, exp_name, kind, args.model, env)
    check_output_dir = TrainingRun.check_output_dir

    def state(self):
        return {
            "kind": KIND,
            "model_name": self.args.model,
            "segmentor": to_plain(dict(self.config)),
            "model": {k: v.numpy() for k, v in self.model_core.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "epoch": 0,  # iteration-based: progress is batches_done (= iterations done)
            "batches_done": int(self.iteration),
            "iteration": int(self.iteration),
            "global_step": int(self.iteration),
            "scaler": self.stepper.state_dict(),
            "args": to_plain(vars(self.args)),
            "rng": rng_state(),
            "best_mIoU": self.best_miou,
            "metrics": to_plain(dict(self.last_metrics)),
        }

    def restore(self, state, path):
        strict_load(self.model_core, state["model"], path)
        self.optimizer.set_state_dict(state["optimizer"])
        self.stepper.load_state_dict(state.get("scaler"))
        set_rng_state(state.get("rng"))
        self.iteration = int(state.get("iteration", state.get("batches_done") or 0))
        self.best_miou = state.get("best_mIoU")
        logger.info("resumed from %s: continuing at iteration %d", path, self.iteration)

    def resume_decision(self):
        args = self.args
        if self.output_dir:
            remove_stale_temporaries(self.output_dir)
        if args.resume:
            state = load_checkpoint(args.resume)
            if not isinstance(state, dict) or "optimizer" not in state or "model" not in state:
                raise ValueError(f"--resume {args.resume}: not a training checkpoint of this package "
                                 "(use --finetune for pretrained or official weights)")
            found = (state.get("kind"), state.get("model_name"))
            if not identity_matches(found, KIND, args.model):
                raise ValueError(f"--resume {args.resume} is {describe_identity(*found)}, not of this "
                                 f"{KIND} run of {args.model} (use --finetune to start from its "
                                 "encoder)")
            return args.resume
        if self.output_dir and args.auto_resume:
            path, _, _ = scan_output_dir(self.output_dir, self.exp_name, KIND, args.model, load=True)
            return path
        return None

    def maybe_resume(self):
        """Rank 0 decides which checkpoint (if any) the run continues from; every rank loads it."""
        error, path = None, None
        if self.env.is_main:
            try:
                path = self.resume_decision()
            except (OSError, ValueError) as err:
                error = str(err).strip().splitlines()[0]
        if self.env.distributed:
            error, path = broadcast_object((error, path))
        if error:
            raise ValueError(error)
        if path:
            self.restore(load_checkpoint(path), path)
        return path

    def save(self, numbered, best):
        if not self.output_dir or not self.env.is_main:
            return
        state = self.state()
        save_training_checkpoint(state, self.output_dir, "latest", self.exp_name)
        if numbered:
            save_training_checkpoint(state, self.output_dir, self.iteration, self.exp_name)
        if best:
            path = os.path.join(self.output_dir, f"{checkpoint_prefix(self.exp_name)}checkpoint-best.pd")
            save_checkpoint(state, path)
            logger.info("new best mIoU %.2f: saved %s", self.best_miou, path)

    # ------------------------------------------------------------------------ train
    def learning_rate(self, iteration):
        a = self.args
        return poly_lr(iteration, a.lr, a.iters, a.power, a.min_lr, a.warmup_iters, a.warmup_ratio)

    def fit(self):
        args = self.args
        self.maybe_resume()
        self.open_logs()
        self.model.train()
        window = {"loss": [], "decode": [], "aux": []}
        tick = time.time()
        while self.iteration < args.iters:
            pass_index, start = divmod(self.iteration, self.batches_per_pass)
            self.loader.set_epoch(pass_index, start)
            for i, batch in enumerate(limited(self.loader, self.batches_per_pass - start), start=start):
                apply_lr(self.optimizer, self.learning_rate(self.iteration))
                paddle.seed(derive_seed(args.seed, pass_index, i, self.env.rank))
                with self.stepper.autocast():
                    logits = self.model(batch["images"])
                loss, parts = segmentation_loss(logits, batch["labels"], args.aux_weight)
                try:
                    self.stepper.backward(loss, 0)
                except NonFiniteLossError as err:
                    raise NonFiniteLossError(f"stopping: non-finite loss at iteration {self.iteration} "
                                             f"({err}); lower the learning rate") from None
                self.iteration += 1
                window["loss"].append(float(loss.item()))
                for name, value in parts.items():
                    window[name].append(float(value.item()))
                if self.iteration % args.print_freq == 0 or self.iteration == args.iters:
                    tick = self.log_progress(window, tick)
                evaluate_now = self.iteration % args.eval_interval == 0 or self.iteration == args.iters
                if evaluate_now:
                    self.evaluate_and_log()
                if self.iteration % args.save_interval == 0 or self.iteration == args.iters or evaluate_now:
                    improved = evaluate_now and self.last_metrics.get("improved", False)
                    self.save(self.iteration % args.save_interval == 0 or self.iteration == args.iters,
                              improved)
                if self.iteration >= args.iters:
                    break
        self.writer.close()
        return self

    def log_progress(self, window, tick):
        now = time.time()
        steps = max(len(window["loss"]), 1)
        seconds = (now - tick) / steps
        values = {k: float(np.mean(v)) for k, v in window.items() if v}
        values = dist_rt.all_reduce_mean(values)
        eta = seconds * (self.args.iters - self.iteration)
        lr = self.optimizer.get_lr()
        logger.info("iter [%d/%d]  lr %.3e  %s  %.3f s/it  eta %s", self.iteration, self.args.iters,
                    lr, "  ".join(f"{k} {v:.4f}" for k, v in values.items()), seconds,
                    time.strftime("%H:%M:%S", time.gmtime(eta)))
        for name, value in values.items():
            self.writer.add_scalar(f"train/{name}", value, self.iteration)
        self.writer.add_scalar("opt/lr", lr, self.iteration)
        for v in window.values():
            v.clear()
        return now

    def evaluate_and_log(self):
        stats, shown = evaluate_segmentation(self.model_core, self.val_set, self.config, self.precision,
                                             self.env, self.args.vis_count if self.env.is_main else 0)
        improved = self.best_miou is None or stats["mIoU"] > self.best_miou
        if improved:
            self.best_miou = stats["mIoU"]
        logger.info("iteration %d: mIoU %.2f  mAcc %.2f  aAcc %.2f on %d images (best mIoU %.2f)",
                    self.iteration, stats["mIoU"], stats["mAcc"], stats["aAcc"], stats["images"],
                    self.best_miou)
        self.last_metrics = {"mIoU": stats["mIoU"], "mAcc": stats["mAcc"], "aAcc": stats["aAcc"],
                             "improved": improved}
        self.json_log.write({"iteration": self.iteration, "mIoU": stats["mIoU"], "mAcc": stats["mAcc"],
                             "aAcc": stats["aAcc"], "IoU": stats["IoU"], "best_mIoU": self.best_miou,
                             "lr": self.optimizer.get_lr(), "eval_seconds": stats["eval_seconds"]})
        self.writer.add_scalars("val", {k: stats[k] for k in ("mIoU", "mAcc", "aAcc")}, self.iteration)
        for k, (name, image, pred, truth) in enumerate(shown):
            h = max(image.shape[0], pred.shape[0])
            panel = np.concatenate([image, pred, truth], axis=1) if image.shape[:2] == pred.shape[:2] \
                else pred
            self.writer.add_image(f"val/mask_{k}_{name}", panel[:h], self.iteration)
        self.writer.flush()
        return stats


__all__ = ["SegmentationRun", "evaluate_segmentation", "pixel_cross_entropy", "segmentation_loss"]
