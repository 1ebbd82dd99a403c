"""One optimisation step, shared by pretraining and fine-tuning: autocast, loss scaling,
gradient accumulation, clipping and the handling of non-finite losses.

Accumulation: the loss of each of ``accum_iter`` micro-batches is divided by ``accum_iter``
and gradients add up, so with per-sample mean losses the update equals the one of a batch
``accum_iter`` times larger. Under paddle.DataParallel the gradient all-reduce is skipped
on all but the last micro-batch (``no_sync``); averaging is linear, so the result is the same.
Paddle's DataParallel prepares the all-reduce in the FORWARD, so the forward of a micro-batch
must run inside ``autocast(micro_step)`` (which enters ``no_sync`` for all but the last one),
not only its backward: otherwise every micro-batch is all-reduced.
"""
import contextlib

import paddle

from ..runtime.amp import DynamicLossScaler, clip_grads_, grad_norm_tensor
from ..runtime.distributed import heartbeat, unwrap_model


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
        self.params = [p for p in unwrap_model(model).parameters() if not p.stop_gradient]
        self._loss_bad = None  # non-finite loss seen in the current accumulation group

    def autocast(self, micro_step=None):
        """The forward's context: autocast, and for a micro-batch ``micro_step`` that is not the
        last of its accumulation group, DataParallel's ``no_sync`` (which must hold the forward
        as well as the backward, see the module's docstring)."""
        if micro_step is None:
            return self.precision.autocast()
        stack = contextlib.ExitStack()
        stack.enter_context(self.sync_context(micro_step))
        stack.enter_context(self.precision.autocast())
        return stack

    def sync_context(self, micro_step):
        """No gradient all-reduce before the last micro-batch of an accumulation group."""
        last = (micro_step + 1) % self.accum_iter == 0
        if not last and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss, micro_step):
        """Back-propagate one micro-batch; on the last one of a group, step the optimizer.
        Returns a dict: ``stepped`` (an update happened), ``skipped`` (overflow, no update),
        ``grad_norm`` (a 0-d tensor, before clipping; None unless stepped) and ``loss_scale``.

        Every micro-batch is back-propagated, also one with a non-finite loss, so that every
        data-parallel rank joins every gradient all-reduce. The decision to step is taken
        once per group from one flag: any non-finite loss of the group or any non-finite
        gradient, reduced over the ranks (max), so all ranks skip together and keep the same
        loss scale. That flag is the only host sync of a step."""
        last = (micro_step + 1) % self.accum_iter == 0
        loss_bad = paddle.logical_not(paddle.isfinite(loss.detach())).reshape([1])
        self._loss_bad = loss_bad if self._loss_bad is None else \
            paddle.logical_or(self._loss_bad, loss_bad)
        with self.sync_context(micro_step):
            self.scaler.scale_loss(loss / self.accum_iter).backward()
        if not last:
            return {"stepped": False, "skipped": False, "grad_norm": None,
                    "loss_scale": self.scaler.scale}
        found_inf = self.scaler.found_inf_and_unscale_(self.params)
        # [this rank's loss, any rank's loss, any rank's gradients]: one reduction, one sync
        flags = paddle.concat([self._loss_bad, self._loss_bad, found_inf]).astype("int32")
        self._loss_bad = None
        if _distributed(self.model):
            import paddle.distributed as dist

            shared = flags[1:]
            dist.all_reduce(shared, op=dist.ReduceOp.MAX)
            flags = paddle.concat([flags[:1], shared])
        own_loss_bad, any_loss_bad, any_grad_bad = (bool(v) for v in flags.numpy().tolist())
        heartbeat(f"the update after micro-batch {micro_step}")  # every rank got this far
        if any_loss_bad or any_grad_bad:
            self.optimizer.clear_grad()
            self.scaler.update(found_inf=True)
            if own_loss_bad:
                what = f"loss is {float(loss.item())}" if bool(
                    paddle.logical_not(paddle.isfinite(loss)).item()) else "a non-finite loss"
            elif any_loss_bad:
                what = "a non-finite loss on another rank"
            else:
                what = "non-finite gradients"
            if not self.scaler.enabled:
                raise NonFiniteLossError(what)
            self._check_skips(what)
            return {"stepped": False, "skipped": True, "grad_norm": None,
                    "loss_scale": self.scaler.scale}
        if self.clip_grad:
            grad_norm = clip_grads_(self.params, self.clip_grad)
        else:
            grad_norm = grad_norm_tensor(self.params)
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


def _distributed(model):
    if not isinstance(model, paddle.DataParallel):
        return False
    import paddle.distributed as dist

    return dist.get_world_size() > 1
