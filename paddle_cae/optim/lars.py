"""LARS as MAE's linear probing uses it (``util/lars.py``, from MoCo v3).

For a parameter with more than one dimension the gradient gets the weight decay and is then
rescaled by the trust ratio ``trust_coefficient * ||p|| / ||g + wd * p||`` (Frobenius norms of
the whole tensor; the ratio is 1 when either norm is 0). Parameters with one dimension or
fewer (biases, norm weights) get neither. Then plain momentum, no dampening, no Nesterov:

    mu <- momentum * mu + d;   p <- p - lr * mu
"""
import paddle

from .base import GroupOptimizer


class LARS(GroupOptimizer):
    state_tensors = ("mu",)

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, lr, {"weight_decay": float(weight_decay),
                                      "momentum": float(momentum),
                                      "trust_coefficient": float(trust_coefficient)})

    def _update(self, param, grad, group, state):
        update = grad
        if param.ndim > 1:
            update = grad + param * group["weight_decay"]
            param_norm = paddle.sqrt(paddle.sum(paddle.square(param)))
            update_norm = paddle.sqrt(paddle.sum(paddle.square(update)))
            one = paddle.ones_like(param_norm)
            ratio = paddle.where(
                param_norm > 0.0,
                paddle.where(update_norm > 0.0,
                             group["trust_coefficient"] * param_norm / update_norm, one),
                one,
            )
            update = update * ratio
        if "mu" not in state:
            state["mu"] = paddle.zeros_like(param)
        mu = state["mu"]
        mu.scale_(group["momentum"]).add_(update)
        param.add_(mu * (-group["lr"]))
