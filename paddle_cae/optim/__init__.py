"""Optimizers, parameter groups and schedules of the MAE / CAE / BootMAE recipes."""
from .adamw import AdamW
from .factory import build_optimizer
from .lars import LARS
from .param_groups import (
    assign_param_groups,
    describe_param_groups,
    layer_id_for_vit,
    layer_scales,
    param_groups,
)
from .schedules import (
    apply_lr,
    cosine_scheduler,
    ema_decay_for_epoch,
    feature_weight_at,
    mae_lr_at,
)
from .sgd import SGD

__all__ = [
    "AdamW", "LARS", "SGD", "build_optimizer", "assign_param_groups", "describe_param_groups",
    "layer_id_for_vit", "layer_scales", "param_groups", "apply_lr", "cosine_scheduler",
    "ema_decay_for_epoch", "feature_weight_at", "mae_lr_at",
]
