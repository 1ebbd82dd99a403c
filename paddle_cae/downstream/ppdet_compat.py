"""Running ``paddledet`` 2.6.0 (the newest on PyPI, written for Paddle 2.4) on Paddle >= 2.5: two
narrow fixes, applied by :func:`apply` before a detector is built.

1. 0-D tensors.

Paddle 2.5 made indexing a 1-D tensor return a 0-D tensor (``paddle.shape(x)[0]``); paddledet
2.6.0 still concatenates such values (``paddle.concat([paddle.shape(rois)[0], ...])``, e.g. the
proposal counts of its RPN head), which Paddle >= 2.5 refuses ("The axis is expected to be in
range of [0, 0)"). :func:`patch_zero_dim_concat` gives the affected ppdet modules a ``paddle``
whose ``concat`` first turns 0-D inputs into 1-D ones of one element (what the code meant); every
other name is Paddle's own.

2. Its layer-decay AdamW (``AdamWDL``) tests ``major >= 2 and minor >= 4`` for "Paddle 2.4 or
later", which Paddle 3.0-3.3 fail; it then takes its Paddle < 2.4 path, which calls an optimizer
method Paddle 3 no longer has (``_append_decoupled_weight_decay``). :func:`fix_adamwdl_version_test`
sets the test's result to what it means (True) and drops the old-path override, so AdamWDL uses
Paddle's ``AdamW(lr_ratio=...)`` as it does on 2.4-2.6. Paddle implements ``lr_ratio`` on GPUs only:
on a CPU the layer-wise decay of the recipes cannot run (``set_param_lr_func: null`` trains
without it).

Nothing else in ppdet or Paddle changes.
"""
import importlib

import paddle

# ppdet modules that concatenate 0-D shape values on the two-stage (R-CNN) paths
ZERO_DIM_MODULES = (
    "ppdet.modeling.proposal_generator.rpn_head",
    "ppdet.modeling.proposal_generator.target",
    "ppdet.modeling.heads.bbox_head",
    "ppdet.modeling.heads.cascade_head",
    "ppdet.modeling.heads.mask_head",
    "ppdet.modeling.post_process",
)


class _PaddleWithZeroDimConcat:
    """``paddle`` with a ``concat`` that accepts 0-D tensors."""

    def __getattr__(self, name):
        return getattr(paddle, name)

    @staticmethod
    def concat(x, axis=0, name=None):
        if isinstance(x, (list, tuple)):
            x = [t.reshape([1]) if isinstance(t, paddle.Tensor) and t.ndim == 0 else t for t in x]
        return paddle.concat(x, axis=axis, name=name)


def patch_zero_dim_concat(modules=ZERO_DIM_MODULES):
    """Apply the shim to ``modules`` (those that import); returns their names."""
    patched = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, "paddle", None) is paddle:
            module.paddle = _PaddleWithZeroDimConcat()
            patched.append(name)
    return patched


def fix_adamwdl_version_test():
    """Returns True when the fix was needed (Paddle >= 3.0 with minor < 4)."""
    try:
        adamw = importlib.import_module("ppdet.optimizer.adamw")
    except ImportError:
        return False
    if getattr(adamw, "IS_PADDLE_LATER_2_4", True):
        return False
    adamw.IS_PADDLE_LATER_2_4 = True
    if "_append_optimize_op" in vars(adamw.AdamWDL):
        delattr(adamw.AdamWDL, "_append_optimize_op")
    return True


def apply():
    patch_zero_dim_concat()
    fix_adamwdl_version_test()


__all__ = ["apply", "fix_adamwdl_version_test", "patch_zero_dim_concat"]
