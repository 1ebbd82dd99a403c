"""The speed wing: everything that exists only for speed, beside the reference code it
accelerates (the reference rooms -- models, data, optim, runtime, engine, loading, methods, io,
inference -- import nothing from here).

Entry points, called once where a run is built (cli/, api.py, benchmarks/):

* :func:`accelerate` ``(model)``: swaps the model's layers, in place, for their fast
  subclasses (same parameters and names; :data:`paddle_cae.fast.layers.FAST_CLASSES`), and sets
  the attention mode ``PADDLE_CAE_ATTENTION`` asks for. ``PADDLE_CAE_FUSED_OPS=0`` swaps
  nothing: the reference path, the operators a GPU runs.
* :func:`accelerate_optimizer` ``(optimizer)``: the optimizer-step counterpart (AdamW's kernel,
  and through :func:`accelerate_steps` the one-call non-finite check, gradient norm and
  clipping, and the EMA update).

How a kernel is chosen: see README.md in this folder.
"""
import logging

from . import switches

logger = logging.getLogger("paddle_cae")

__all__ = ["accelerate", "accelerate_optimizer", "accelerate_steps", "switches"]


def _swap_classes(model):
    """Swap every sub-layer (and ``model`` itself) whose class has a fast subclass; returns the
    number of layers swapped."""
    from .layers import FAST_CLASSES

    swapped = 0
    fast = FAST_CLASSES.get(type(model))
    if fast is not None:
        model.__class__ = fast
        swapped += 1
    for owner in [model] + list(model.sublayers()):
        for name, child in owner.named_children():
            fast = FAST_CLASSES.get((type(owner), name)) or FAST_CLASSES.get(type(child))
            if fast is not None:
                child.__class__ = fast
                swapped += 1
    return swapped


def _set_attention_mode(model, explicit):
    from ..models.layers import Attention

    for layer in [model] + list(model.sublayers()):
        if isinstance(layer, Attention):
            layer.use_sdpa = not explicit


def accelerate(model, environ=None):
    """Make ``model`` (a built nn.Layer: a model, or the DALL-E tokenizer) use the fast layers;
    returns it. Reads ``PADDLE_CAE_FUSED_OPS`` and ``PADDLE_CAE_ATTENTION`` (from ``environ``,
    default the process environment) once, here."""
    _set_attention_mode(model, switches.explicit_attention(environ))
    if not switches.fused_ops(environ):
        return model
    swapped = _swap_classes(model)
    logger.debug("accelerate: %d layers of %s on the fused CPU kernels", swapped,
                 type(model).__name__)
    return model


def accelerate_optimizer(optimizer, environ=None):
    """The optimizer-step counterpart of :func:`accelerate`: AdamW's one-pass kernel, and
    :func:`accelerate_steps`; returns ``optimizer``."""
    from .optim import accelerate_optimizer as _accelerate_optimizer

    return _accelerate_optimizer(optimizer, environ)


def accelerate_steps(environ=None):
    """Install the gradient-list kernels (the loss scaler's non-finite check, the gradient
    norm and clipping) and the EMA kernel for the steps that follow (the reference ones with
    ``PADDLE_CAE_FUSED_OPS=0``); :func:`accelerate_optimizer` does it too."""
    from .optim import accelerate_steps as _accelerate_steps

    return _accelerate_steps(environ)
