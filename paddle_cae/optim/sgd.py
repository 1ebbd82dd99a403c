"""SGD with momentum as PyTorch defines it (used by CAE's attentive probe, Nesterov 0.9).

Weight decay is added to the gradient (L2, not decoupled). The momentum buffer starts as the
first gradient; with Nesterov the step uses ``g + momentum * buf``.
"""
from .base import GroupOptimizer


class SGD(GroupOptimizer):
    state_tensors = ("momentum_buffer",)

    def __init__(self, params, lr=0.01, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum needs momentum > 0 and no dampening")
        super().__init__(params, lr, {"momentum": float(momentum), "dampening": float(dampening),
                                      "weight_decay": float(weight_decay),
                                      "nesterov": bool(nesterov)})

    def _update(self, param, grad, group, state):
        if group["weight_decay"] != 0.0:
            grad = grad + param * group["weight_decay"]
        momentum = group["momentum"]
        if momentum != 0.0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.clone()
            else:
                buf.scale_(momentum).add_(grad * (1.0 - group["dampening"]))
            grad = grad + buf * momentum if group["nesterov"] else buf
        param.add_(grad * (-group["lr"]))
