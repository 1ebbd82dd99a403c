"""Build the optimizer a recipe names (``--opt adamw`` / ``lars`` / ``sgd``)."""
from .adamw import AdamW
from .lars import LARS
from .sgd import SGD

OPTIMIZERS = ("adamw", "lars", "sgd", "momentum")


def build_optimizer(name, param_groups, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                    momentum=0.9, nesterov=False, trust_coefficient=0.001, fused=False):
    """``param_groups``: a parameter list or groups from :func:`param_groups`. ``weight_decay``
    is the default for groups that carry none (groups built by this package always carry one).
    ``sgd`` uses ``momentum`` (0 for plain SGD) and ``nesterov``; ``fused`` picks AdamW's
    faster kernel path (see :mod:`paddle_cae.optim.adamw`)."""
    key = name.lower()
    if key == "adamw":
        return AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                     fused=fused)
    if key == "lars":
        return LARS(param_groups, lr=lr, weight_decay=weight_decay, momentum=momentum,
                    trust_coefficient=trust_coefficient)
    if key in ("sgd", "momentum"):
        return SGD(param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                   nesterov=nesterov)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
