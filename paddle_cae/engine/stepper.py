"""One optimisation step, shared by pretraining and fine-tuning: autocast, loss scaling,
gradient accumulation, clipping and the handling of non-finite losses.

Accumulation: the loss of each of ``accum_iter`` micro-batches is divided by ``accum_iter``
and gradients add up, so with per-sample mean losses the update equals the one of a batch
``accum_iter`` times larger. Under paddle.DataParallel the gradient all-reduce is skipped
on all but the last micro-batch (``no_sync``); averaging is linear, so the result is the same.
"""
import contextlib
import math

import paddle

from ..runtime.amp import DynamicLossScaler, clip_grad_norm_, global_grad_norm


class NonFiniteLossError(RuntimeError):
    pass


class Stepper:
    def __init__(self, model, optimizer, precision, accum_iter=1, clip_grad=None,
                 max_consecutive_skips=20):
        if accum_iter < 1:
            raise ValueError(f"--accum_iter must be >= 1, got {accum_iter}")
        self.model = model
        self.optimizer = optimizer
        self.precision = precision
        self.scaler = DynamicLossScaler(enabled=precision.needs_loss_scaling)
        self.accum_iter = int(accum_iter)
        self.clip_grad = clip_grad
        self.max_consecutive_skips = max_consecutive_skips
        self.params = [p for p in _unwrap(model).parameters() if not p.stop_gradient]

    def autocast(self):
        return self.precision.autocast()

    def sync_context(self, micro_step):
        """No gradient all-reduce before the last micro-batch of an accumulation group."""
        last = (micro_step + 1) % self.accum_iter == 0
        if not last and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss, micro_step):
        """Back-propagate one micro-batch; on the last one of a group, step the optimizer.
        Returns a dict: ``stepped`` (an update happened), ``skipped`` (overflow, no update),
        ``grad_norm`` (before clipping, None unless stepped) and ``loss_scale``."""
        loss_value = float(loss.item())
        if not math.isfinite(loss_value):
            if not self.scaler.enabled:
                raise NonFiniteLossError(f"loss is {loss_value}")
            # with fp16 scaling a non-finite loss is an overflow: drop the whole group
            self.optimizer.clear_grad()
            self.scaler.update(found_inf=True)
            self._check_skips(loss_value)
            return {"stepped": False, "skipped": True, "grad_norm": None,
                    "loss_scale": self.scaler.scale}
        with self.sync_context(micro_step):
            self.scaler.scale_loss(loss / self.accum_iter).backward()
        if (micro_step + 1) % self.accum_iter != 0:
            return {"stepped": False, "skipped": False, "grad_norm": None,
                    "loss_scale": self.scaler.scale}
        finite = self.scaler.unscale_(self.params)
        if not finite:
            self.optimizer.clear_grad()
            self.scaler.update(found_inf=True)
            if not self.scaler.enabled:
                raise NonFiniteLossError("gradients are not finite")
            self._check_skips("non-finite gradients")
            return {"stepped": False, "skipped": True, "grad_norm": None,
                    "loss_scale": self.scaler.scale}
        if self.clip_grad:
            grad_norm = clip_grad_norm_(self.params, self.clip_grad)
        else:
            grad_norm = global_grad_norm(self.params)
        self.optimizer.step()
        self.optimizer.clear_grad()
        self.scaler.update(found_inf=False)
        return {"stepped": True, "skipped": False, "grad_norm": grad_norm,
                "loss_scale": self.scaler.scale}

    def _check_skips(self, what):
        if self.scaler.consecutive_skips > self.max_consecutive_skips:
            raise NonFiniteLossError(
                f"{self.scaler.consecutive_skips} consecutive steps skipped ({what}); the loss "
                f"scale fell to {self.scaler.scale:g}")

    def state_dict(self):
        return self.scaler.state_dict()

    def load_state_dict(self, state):
        self.scaler.load_state_dict(state)


def _unwrap(model):
    return model._layers if isinstance(model, paddle.DataParallel) else model
