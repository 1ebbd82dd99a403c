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
* :func:`paddle_cae.fast.data.accelerate_dataset` ``(dataset)``: the data counterpart (the exact
  C resampler as the crop + resize of the dataset's pipeline).

How a kernel is chosen: see README.md in this folder.
"""
import logging

from . import switches

logger = logging.getLogger("paddle_cae")

__all__ = ["accelerate", "accelerate_optimizer", "accelerate_steps", "switches"]


def _children(layer):
    """(name, layer) of ``layer``'s sub-layers and of the layers it holds outside them (a
    frozen teacher, an attached tokenizer: kept out of ``state_dict`` on purpose)."""
    import paddle.nn as nn

    children = list(layer.named_children())
    registered = {id(child) for _, child in children}
    children += [(name, value) for name, value in vars(layer).items()
                 if isinstance(value, nn.Layer) and id(value) not in registered]
    return children


def _walk(model):
    """(owner, name, layer) for every layer reachable from ``model`` (owner None for it)."""
    seen, stack = {id(model)}, [(None, None, model)]
    while stack:
        owner, name, layer = stack.pop()
        yield owner, name, layer
        for child_name, child in _children(layer):
            if id(child) not in seen:
                seen.add(id(child))
                stack.append((layer, child_name, child))


def _swap_classes(model):
    """Swap every layer reachable from ``model`` (itself included) whose class has a fast
    subclass; returns the number of layers swapped."""
    from .layers import FAST_CLASSES

    found = [(layer, FAST_CLASSES.get((type(owner), name)) or FAST_CLASSES.get(type(layer)))
             for owner, name, layer in _walk(model)]
    for layer, fast in found:
        if fast is not None:
            layer.__class__ = fast
    return sum(fast is not None for _, fast in found)


def _set_attention_mode(model, explicit):
    from ..models.layers import Attention

    for _, _, layer in _walk(model):
        if isinstance(layer, Attention):
            layer.use_sdpa = not explicit


def accelerate(model, environ=None):
    """Make ``model`` (a built nn.Layer: a model, or the DALL-E tokenizer) and the layers it
    holds (BootMAE's teacher, an attached tokenizer) use the fast layers; returns it. Reads
    ``PADDLE_CAE_FUSED_OPS`` and ``PADDLE_CAE_ATTENTION`` (from ``environ``, default the
    process environment) once, here."""
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
