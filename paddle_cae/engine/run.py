"""What every training run shares (pretraining, fine-tuning, probing): the rank-independent
loader, the per-update schedule, the optimisation step, checkpoint state, resume and logs.

A subclass adds its own training loop and what its checkpoints carry beyond the common
state (``extra_state`` / ``restore_extra``).
"""
import logging
import os

import paddle

from ..data.loader import build_loader, derive_seed
from ..loading.pretrained import strict_load
from ..optim import apply_lr
from ..optim.schedules import LearningRateSchedule
from ..runtime import distributed as dist_rt
from ..runtime.checkpoint import CheckpointError, load_checkpoint, to_plain
from ..runtime.collectives import broadcast_object
from ..runtime.distributed import data_parallel
from ..runtime.logging import JsonLinesLog, VisualDLWriter
from ..runtime.resume import (check_no_foreign_checkpoints, describe_identity, identity_matches,
                              remove_stale_temporaries, resume_position, rng_state,
                              scan_output_dir, set_rng_state)
from .scalars import LossTrend
from .stepper import Stepper

logger = logging.getLogger("paddle_cae")


def build_train_loader(dataset, args, env):
    """The run's loader (:func:`paddle_cae.data.loader.build_loader`)."""
    return build_loader(dataset, args.batch_size, seed=args.seed, num_workers=int(args.num_workers),
                        world_size=env.world_size, rank=env.rank)


def limited(loader, count):
    for k, batch in enumerate(loader):
        if k >= count:
            break
        yield batch


class TrainingRun:
    kind = "pretrain"

    def __init__(self, args, model, train_set, optimizer, precision, env):
        self.args = args
        self.env = env
        self.model_core = model
        self.model = data_parallel(model, env)
        self.train_set = train_set
        self.optimizer = optimizer
        self.precision = precision
        self.output_dir = args.output_dir or None
        self.exp_name = getattr(args, "exp_name", "") or None
        self.loader = build_train_loader(train_set, args, env)
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
        self.loss_trend = LossTrend()  # what a stop on a non-finite loss says
        # what this run is (fine-tune / probe runs say it in args.phase before their own
        # constructor sets it)
        self.kind = getattr(args, "phase", None) or type(self).kind
        self.check_output_dir()
        # VisualDL: every curve against the optimizer step, images seen as their own curve
        self.writer = VisualDLWriter(getattr(args, "log_dir", None),
                                     enabled=env.is_main and bool(self.output_dir),
                                     step_of=lambda: self.global_step,
                                     images_per_step=args.batch_size * self.accum_iter * env.world_size)
        if not self.stepper.scaler.enabled:
            self.writer.skip_tags.add("opt/loss_scale")  # 1.0 throughout without fp16
        self.writer.add_hparams(vars(args), ["train/loss"])
        self.json_log = JsonLinesLog(
            os.path.join(self.output_dir, "log.txt") if self.output_dir else None,
            enabled=env.is_main)

    # ------------------------------------------------------------------ per batch
    def begin_batch(self, epoch, i):
        """Schedule at the start of an accumulation group; seed what the model draws itself
        from (seed, epoch, batch, rank) so a resumed run draws the same numbers."""
        if i % self.accum_iter == 0:
            lr, wd = self.schedule.at(epoch, i // self.accum_iter)
            apply_lr(self.optimizer, lr, wd)
        paddle.seed(derive_seed(self.args.seed, epoch, i, self.env.rank))

    def epoch_batches(self, epoch, start_batch):
        self.loader.set_epoch(epoch, start_batch)
        return limited(self.loader, self.batches_per_epoch - start_batch)

    # ---------------------------------------------------------------- checkpoints
    def training_state(self, epoch, batches_done):
        state = {
            "kind": self.kind,
            "model_name": self.args.model,
            "model": {k: v.numpy() for k, v in self.model_core.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "epoch": int(epoch),
            "batches_done": batches_done,
            "images_per_batch": int(self.args.batch_size) * int(self.env.world_size),
            "train_loss": self.loss_trend.last(),  # the loss it was saved at
            "global_step": int(self.global_step),
            "scaler": self.stepper.state_dict(),
            "args": to_plain(vars(self.args)),
            "rng": rng_state(),
        }
        state.update(self.extra_state())
        return state

    def extra_state(self):
        return {}

    def restore_extra(self, state):
        pass

    def restore(self, state, path):
        start_epoch, start_batch, note = resume_position(
            state, self.args.batch_size, self.env.world_size, self.accum_iter, path)
        strict_load(self.model_core, state["model"], path)
        self.optimizer.set_state_dict(state["optimizer"])
        self.stepper.load_state_dict(state.get("scaler"))
        self.restore_extra(state)
        set_rng_state(state.get("rng"))
        self.global_step = int(state.get("global_step", 0))
        self.start_epoch, self.start_batch = start_epoch, start_batch
        if note:
            logger.info("resume: %s", note)
        self.last_good_checkpoint = path
        if state.get("train_loss") is not None:
            self.loss_trend.reading(os.path.basename(path), state["train_loss"])
        self.loss_trend.checkpoint(path, state.get("train_loss"))
        where = (f"epoch {self.start_epoch}" if not self.start_batch
                 else f"epoch {self.start_epoch}, batch {self.start_batch}")
        logger.info("resumed from %s: continuing at %s", path, where)

    def check_output_dir(self):
        """Before anything is written: stop (one line, on every rank) when --output_dir holds
        checkpoints of another kind of run or another model under the names this run writes."""
        if not self.output_dir:
            return
        error = None
        if self.env.is_main:
            try:
                _, _, foreign = scan_output_dir(self.output_dir, self.exp_name, self.kind,
                                                getattr(self.args, "model", None), load=False)
                check_no_foreign_checkpoints(foreign, self.kind, getattr(self.args, "model", None))
            except ValueError as err:
                error = str(err)
        if self.env.distributed:
            error = broadcast_object(error)
        if error:
            raise ValueError(error)

    def resume_decision(self):
        """What this run resumes from, decided from this process's view of the files:
        ``(path, state)`` or ``(None, None)``. Raises ValueError (one line) for a --resume file
        of another kind or model (a foreign --output_dir was refused at construction:
        :meth:`check_output_dir`)."""
        args = self.args
        model_name = getattr(args, "model", None)
        path, state = None, None
        if self.output_dir:
            remove_stale_temporaries(self.output_dir)
        auto = bool(getattr(args, "auto_resume", False)) and not getattr(args, "resume", "")
        if self.output_dir and auto:
            path, state, _ = scan_output_dir(self.output_dir, self.exp_name, self.kind, model_name,
                                             load=True)
        if getattr(args, "resume", ""):
            path = args.resume
            state = load_checkpoint(path)
            if not isinstance(state, dict) or "optimizer" not in state or "model" not in state:
                raise ValueError(f"--resume {path}: not a training checkpoint of this package "
                                 "(use --finetune for pretrained or official weights)")
            found = (state.get("kind"), state.get("model_name"))
            if not identity_matches(found, self.kind, model_name):
                raise ValueError(f"--resume {path} is {describe_identity(*found)}, not of this "
                                 f"{self.kind} run of {model_name} (use --finetune to start from "
                                 "its weights)")
        return path, state

    def epochs_to_run(self):
        """Resume (:meth:`maybe_resume`), then (epoch, first batch) for every epoch left: the
        resumed epoch from its saved batch, the others from 0."""
        self.maybe_resume()
        for epoch in range(self.start_epoch, self.args.epochs):
            yield epoch, self.start_batch if epoch == self.start_epoch else 0

    def keeps_numbered_checkpoint(self, epoch):
        """The last epoch and every --save_ckpt_freq-th keep a numbered checkpoint."""
        freq = self.args.save_ckpt_freq
        return epoch + 1 == self.args.epochs or bool(freq and (epoch + 1) % freq == 0)

    def maybe_resume(self):
        """--resume PATH, else (by default) the most advanced complete checkpoint of this run in
        --output_dir. Returns the path resumed from, or None.

        Decided once: rank 0 chooses from its view of the files and every rank follows. A rank
        that cannot read the chosen file, or reads other weights under that name (node-local
        folders), receives rank 0's state; all ranks start from the same weights, optimizer state
        and position in the schedule."""
        env = self.env
        if not env.distributed:
            path, state = self.resume_decision()
            if state is not None:
                self.restore(state, path)
            return path
        decision, state = {"path": None, "error": None, "size": None}, None
        if env.is_main:
            try:
                path, state = self.resume_decision()
                decision["path"] = path
                if path is not None:
                    decision["size"] = os.path.getsize(path)
            except (CheckpointError, OSError, ValueError) as err:
                decision["error"] = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        decision = broadcast_object(decision)
        if decision["error"]:
            raise ValueError(decision["error"])
        path = decision["path"]
        if path is None:
            return None
        if not env.is_main:
            try:
                readable = os.path.getsize(path) == decision["size"]
                state = load_checkpoint(path) if readable else None
            except (CheckpointError, OSError, ValueError):
                state = None
        have = 1 if isinstance(state, dict) and "model" in state else 0
        if have:
            self.restore(state, path)
        ok = min(dist_rt.all_gather_ints(have))
        same = ok and len(set(dist_rt.all_gather_ints(self._resume_digest()))) == 1
        if not same:  # rank 0's state for everyone
            state = broadcast_object(state if env.is_main else None)
            if not env.is_main:
                self.restore(state, path)
            logger.info("resume: rank 0's checkpoint %s sent to every rank", path)
        return path

    def _resume_digest(self):
        """Weights and position in training, as one integer to compare between ranks."""
        digest = dist_rt.state_digest(self.model_core)
        return (digest ^ (self.start_epoch * 1000003 + self.start_batch * 7919
                          + self.global_step)) & ((1 << 62) - 1)
