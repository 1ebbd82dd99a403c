"""Small formulas every method's model uses, written once.

* :func:`gather_tokens` - rows of a token sequence picked per sample (masking, un-shuffling);
* :func:`norm_eps_from` - the LayerNorm epsilon named by an official ``norm_layer`` argument;
* :func:`drop_path_rates` - the stochastic-depth rate of every block of a stack;
* :func:`fixed_sincos_table` - a frozen sin-cos position table parameter;
* :func:`normalize_patches` / :func:`denormalize_patches` - per-patch pixel normalisation
  (MAE's ``norm_pix_loss`` target, BootMAE's pixel target) and its inverse;
* :func:`ema_update_` - ``ema <- decay * ema + (1 - decay) * online`` over a state (BootMAE's
  teacher, CAE's alignment encoder, the fine-tuning model EMA);
* :func:`to_uint8_hwc` - a normalised image tensor back to displayable uint8;
* :func:`fp32_region` - autocast switched off for a block (CAE's tokenizer targets).
"""
import re

import numpy as np
import paddle
import paddle.nn as nn

from .pos_embed import sincos_pos_embed

LN_EPS = 1e-6  # the LayerNorm epsilon of every official model (partial(nn.LayerNorm, eps=1e-6))
TORCH_LN_EPS = 1e-5  # a bare ``nn.LayerNorm``: PyTorch's default

__all__ = ["LN_EPS", "TORCH_LN_EPS", "gather_tokens", "norm_eps_from", "drop_path_rates",
           "fixed_sincos_table", "normalize_patches", "denormalize_patches", "ema_update_",
           "to_uint8_hwc", "fp32_region"]


def gather_tokens(x, ids):
    """x [B, N, D] (or [1, N, D], broadcast over the batch), ids [B, n] -> [B, n, D]."""
    b, n = ids.shape
    if x.shape[0] != b:
        x = x.expand([b, x.shape[1], x.shape[2]])
    index = ids.unsqueeze(-1).expand([b, n, x.shape[2]])
    return paddle.take_along_axis(x, index, axis=1)


def norm_eps_from(norm_layer, default=LN_EPS):
    """LayerNorm epsilon named by an official ``norm_layer`` argument.

    Accepts None (``default``), a number, or the text of the official value as configs and
    fixtures record it: ``"partial(nn.LayerNorm, eps=1e-6)"`` -> 1e-6 (``epsilon=`` is read
    too), ``"nn.LayerNorm"`` -> 1e-5 (PyTorch's default)."""
    if norm_layer is None:
        return default
    if isinstance(norm_layer, (int, float)):
        return float(norm_layer)
    text = str(norm_layer)
    found = re.search(r"eps(?:ilon)?\s*=\s*([0-9.]+(?:[eE][-+]?\d+)?)", text)
    if found:
        return float(found.group(1))
    if "LayerNorm" in text:
        return TORCH_LN_EPS
    raise ValueError(f"norm_layer {norm_layer!r}: expected a LayerNorm description such as "
                     "'partial(nn.LayerNorm, eps=1e-6)' or an epsilon")


def drop_path_rates(rate, depth):
    """Stochastic-depth rate of each of ``depth`` blocks: 0 rising linearly to ``rate``
    (the official ``torch.linspace(0, rate, depth)``; a single block gets 0)."""
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


def fixed_sincos_table(layer, dim, grid, layout="moco"):
    """A frozen parameter [1, 1 + H*W, dim] of ``layer`` holding the sin-cos table of
    ``grid`` (zero cls row; see :func:`sincos_pos_embed` for the layouts). The official
    modules keep it with requires_grad=False: it is saved, never trained."""
    table = sincos_pos_embed(dim, grid, cls_token=True, layout=layout)[None]
    # given as the attribute's initializer: a global initializer (zero_filled_parameters) does
    # not override that one
    p = layer.create_parameter(list(table.shape),
                               attr=paddle.ParamAttr(initializer=nn.initializer.Assign(table)))
    p.stop_gradient = True
    return p


def _mean_and_std(patches, axis, eps, unbiased):
    # squares as c * c: the values and gradients of c ** 2, without Paddle's slow CPU pow
    mean = patches.mean(axis=axis, keepdim=True)
    if unbiased:
        # written out: paddle.var warns about dtype promotion on every call
        count = 1
        for a in ([axis] if isinstance(axis, int) else axis):
            count *= patches.shape[a]
        centered = patches - mean
        var = (centered * centered).sum(axis=axis, keepdim=True) / (count - 1)
    else:
        centered = patches - mean
        var = (centered * centered).mean(axis=axis, keepdim=True)
    return mean, paddle.sqrt(var + eps)


def normalize_patches(patches, axis=-1, eps=1e-6, unbiased=True):
    """Each patch normalised by its own mean and standard deviation over ``axis``:
    ``(x - mean) / sqrt(var + eps)``.

    MAE's norm-pix target: patchified [B, N, p*p*C], axis -1, unbiased variance, eps 1e-6.
    BootMAE's pixel target: [B, C, h, p, w, p], axis [3, 5] (per patch AND channel), biased
    variance, eps 1e-5."""
    mean, std = _mean_and_std(patches, axis, eps, unbiased)
    return (patches - mean) / std


def denormalize_patches(pred, patches, axis=-1, eps=1e-6, unbiased=True):
    """Inverse of :func:`normalize_patches` for a prediction ``pred`` shaped like ``patches``:
    ``pred * std + mean`` with each patch's TRUE statistics taken from ``patches`` (how the
    official demos show a normalised-target reconstruction)."""
    mean, std = _mean_and_std(patches, axis, eps, unbiased)
    return pred * std + mean


def _no_tensor_update(ema, online, keep, take):
    return False


_ema_tensor_update = [_no_tensor_update]


def use_ema_tensor_update(update=None):
    """Install ``update(ema, online, keep, take) -> bool`` (in place ``ema = ema * keep +
    online * take``, True when done) for the EMA updates that follow; None: the reference.
    Returns the previous one."""
    previous = _ema_tensor_update[0]
    _ema_tensor_update[0] = _no_tensor_update if update is None else update
    return previous


def _state(holder):
    return holder.state_dict() if isinstance(holder, nn.Layer) else holder


@paddle.no_grad()
def ema_update_(ema, online, decay):
    """In place ``ema <- decay * ema + (1 - decay) * online`` for every entry of ``ema``.

    ``ema`` and ``online`` are layers (their state_dicts: parameters and buffers) or dicts
    name -> tensor. Floating entries are averaged in the EMA entry's own precision with
    ``decay`` a Python float (timm's ModelEma arithmetic); integer entries are copied. A
    per-tensor update installed by :func:`use_ema_tensor_update` is tried first (it must give
    the same values, and returns False where it does not apply)."""
    online = _state(online)
    keep = float(decay)
    take = 1.0 - keep
    for key, ema_value in _state(ema).items():
        if key not in online:
            raise KeyError(f"EMA update: the online model has no entry '{key}'")
        value = online[key].detach()
        if tuple(value.shape) != tuple(ema_value.shape):
            raise ValueError(f"EMA update: '{key}' has shape {list(value.shape)} online but "
                             f"{list(ema_value.shape)} in the EMA copy")
        if paddle.is_floating_point(ema_value):
            if not _ema_tensor_update[0](ema_value, value, keep, take):
                paddle.assign(ema_value * keep + value.astype(ema_value.dtype) * take, ema_value)
        else:
            paddle.assign(value.astype(ema_value.dtype), ema_value)


def to_uint8_hwc(image_chw, mean, std):
    """A normalised [C, H, W] tensor -> uint8 [H, W, C] (``x * std + mean``, clipped to [0, 1])
    for logging and figures."""
    image = image_chw.numpy().transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def fp32_region():
    """Autocast switched off for the block (the DALL-E tokenizer: the official code and PASSL
    compute the target tokens in float32, while its convolutions are on the fp16 white list)."""
    return paddle.amp.auto_cast(enable=False)
