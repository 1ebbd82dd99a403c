"""The transformer layers with the fused CPU kernels of paddle_cae/ops ("fused"), as subclasses
of the reference layers in ``models/layers.py`` with the same parameters.

The variant is chosen once, where a model is built: :func:`block_class`, :func:`mlp_class` and
:func:`cross_attention_class` read the ``PADDLE_CAE_FUSED_OPS`` switch then (``0`` builds the
reference layers: the pure-Paddle operators a GPU runs). A fused layer still computes with the
kernels only for float32 CPU tensors in dynamic graph mode (``fused_ops.applies``); for anything
else (GPU, AMP, ``paddle.jit.to_static`` / export, no C++ compiler) its forward is the
reference's forward.
"""
import functools

import paddle
import paddle.nn as nn

from ..ops import fused as fused_ops
from .common import drop_path_rates
from .layers import Block, DropPath, Mlp

__all__ = ["FusedLayerNorm", "FusedLinear", "FusedMlp", "FusedBlock", "fused_enabled", "block_class",
           "block_stack", "layer_norm_class", "linear_class", "mlp_class", "cross_attention_class",
           "fused_kernels", "fused_attention_branch", "fused_mlp_branch", "fused_block_applies"]


class _kernels:
    """The kernels of paddle_cae/ops for layers built with them: the environment switch was read
    at build time and is not read again (each op still checks dtype, place and graph mode and
    computes the reference formulation where the kernel does not apply)."""
    layer_norm = functools.partial(fused_ops.layer_norm, by_env=False)
    bias_gelu = functools.partial(fused_ops.bias_gelu, by_env=False)
    residual_bias = functools.partial(fused_ops.residual_bias, by_env=False)
    residual_drop_path = functools.partial(fused_ops.residual_drop_path, by_env=False)
    split_heads = functools.partial(fused_ops.split_heads, by_env=False)
    scaled_softmax = functools.partial(fused_ops.scaled_softmax, by_env=False)
    merge_heads = functools.partial(fused_ops.merge_heads, by_env=False)
    heads = functools.partial(fused_ops.heads, by_env=False)
    linear = functools.partial(fused_ops.linear, by_env=False)

    @staticmethod
    def attention(q, k, v, scale):
        # looked up on each call: the FLOP counter (runtime/flops.py) wraps it
        return fused_ops.attention(q, k, v, scale, by_env=False)


def fused_enabled():
    """True unless ``PADDLE_CAE_FUSED_OPS`` turns the fused kernels off (read at build time)."""
    return fused_ops.enabled_by_env()


class FusedLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters) computed by the LayerNorm kernel and its backward
    where the kernels apply; Paddle's own elsewhere."""

    def forward(self, x):
        if self.weight is not None and self.bias is not None and fused_ops.applies(x):
            return _kernels.layer_norm(x, self.weight, self.bias, self._epsilon)
        return nn.LayerNorm.forward(self, x)  # (to_static on Paddle 2.6: no super())


class FusedLinear(nn.Linear):
    """``nn.Linear`` (same parameters) whose bias is added by the bias-add kernel where the
    kernels apply (its backward sums the bias gradient on all threads)."""

    def forward(self, x):
        if self.bias is not None and fused_ops.applies(x):
            return _kernels.linear(x, self.weight, self.bias)
        return nn.Linear.forward(self, x)  # (to_static on Paddle 2.6: no super())


class FusedMlp(Mlp):
    """gelu(x W1 + b1) in one fused pass (same arithmetic, see paddle_cae/ops)."""

    def forward(self, x):
        if isinstance(self.drop, nn.Identity) and self.fc1.bias is not None \
                and fused_ops.applies(x):
            h = _kernels.bias_gelu(paddle.matmul(x, self.fc1.weight), self.fc1.bias)
            return _kernels.linear(h, self.fc2.weight, self.fc2.bias)
        return Mlp.forward(self, x)  # not super(): Paddle 2.6's to_static cannot convert it


class FusedBlock(Block):
    """The block with the fused kernels: LayerNorm, bias + head split, scaled softmax
    (+ relative position bias), head merge, bias + (layer scale) + residual, bias + GELU. Same
    arithmetic as :class:`Block` up to float32 rounding. The attention's ``use_sdpa`` False
    (``PADDLE_CAE_ATTENTION=explicit``) keeps the step-by-step reference instead."""

    mlp_class = FusedMlp

    def kernels_apply(self, x, rel_pos_bias=None):
        return rel_pos_bias is None and fused_block_applies(self, x)

    def forward(self, x, rel_pos_bias=None):
        if not self.kernels_apply(x, rel_pos_bias):
            return Block.forward(self, x, rel_pos_bias)  # (to_static on Paddle 2.6: no super())
        x = self._residual(x, fused_attention_branch(self, x), self.attn.proj.bias, self.gamma_1)
        return self._residual(x, fused_mlp_branch(self, x), self.mlp.fc2.bias, self.gamma_2)

    def _residual(self, x, y, bias, gamma):
        drop = self.drop_path
        if self.training and isinstance(drop, DropPath) and drop.drop_prob > 0.0:
            return _kernels.residual_drop_path(x, y, bias, gamma, drop.sample_mask(y),
                                               1.0 - drop.drop_prob)
        return _kernels.residual_bias(x, y, bias, gamma)


def fused_block_applies(block, x):
    """Whether a block with ``attn`` and ``mlp`` sub-layers can run on the kernels for input
    ``x``: the attention's sdpa path, no active dropout, an MLP bias, and a float32 CPU tensor
    in dynamic graph mode."""
    attn, mlp = block.attn, block.mlp
    if not attn.use_sdpa:
        return False
    if block.training and not all(isinstance(m, nn.Identity) for m in (
            attn.attn_drop, attn.proj_drop, mlp.drop)):
        return False
    return mlp.fc1.bias is not None and fused_ops.applies(x)


def fused_attention_branch(block, x):
    """``attn(norm1(x))`` of a pre-norm block on the kernels, without the output projection's
    bias (the residual kernel adds it)."""
    norm = block.norm1
    h = _kernels.layer_norm(x, norm.weight, norm.bias, norm._epsilon)
    return paddle.matmul(_attend(block.attn, h), block.attn.proj.weight)


def fused_mlp_branch(block, x):
    """``mlp(norm2(x))`` of a pre-norm block on the kernels, without fc2's bias (the residual
    kernel adds it)."""
    norm, mlp = block.norm2, block.mlp
    h = _kernels.layer_norm(x, norm.weight, norm.bias, norm._epsilon)
    h = _kernels.bias_gelu(paddle.matmul(h, mlp.fc1.weight), mlp.fc1.bias)
    return paddle.matmul(h, mlp.fc2.weight)


def _attend(attn, x):
    """Attention up to (not including) the output projection: [B, N, dim] -> [B, N, inner].
    Same arithmetic as the explicit path: timm scales the scores after q k^T, BEiT scales q
    before."""
    q_scale, s_scale = (attn.scale, 1.0) if attn.style == "beit" else (1.0, attn.scale)
    q, k, v = _kernels.split_heads(paddle.matmul(x, attn.qkv.weight), attn.qkv_bias_vector(),
                                   attn.num_heads, q_scale)
    if attn.relative_position_bias_table is None:
        return _kernels.attention(q, k, v, s_scale)
    bias = attn.relative_bias()
    scores = _kernels.scaled_softmax(paddle.matmul(q, k, transpose_y=True), s_scale, bias)
    return _kernels.merge_heads(paddle.matmul(scores, v))


class _FusedCrossAttention:
    """Head split, softmax, head merge and biased projections of a
    :class:`~paddle_cae.models.layers.CrossAttentionBase` subclass by the fused kernels (each
    falls back to the reference operators itself)."""

    def _heads(self, x):
        return _kernels.heads(x, self.num_heads)

    def _linear(self, x, weight, bias=None):
        return _kernels.linear(x, weight, bias)

    def softmax(self, attn):
        return _kernels.scaled_softmax(attn, 1.0)

    def merge_heads(self, x):
        return _kernels.merge_heads(x)


@functools.lru_cache(maxsize=None)
def _fused_cross_attention(base):
    return type("Fused" + base.__name__, (_FusedCrossAttention, base),
                {"__doc__": base.__doc__, "__module__": base.__module__})


def block_class():
    """The transformer block class for a model built now."""
    return FusedBlock if fused_enabled() else Block


def block_stack(depth, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0,
                attn_drop=0.0, drop_path_rate=0.0, **block_kwargs):
    """``depth`` transformer blocks of the class chosen now (:func:`block_class`), their
    drop-path rates rising linearly from 0 to ``drop_path_rate``; ``block_kwargs`` go to every
    block (init_values, window_size, attn_head_dim, attn_style, norm_eps)."""
    block = block_class()
    return nn.LayerList([
        block(dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, rate, **block_kwargs)
        for rate in drop_path_rates(drop_path_rate, depth)
    ])


def layer_norm_class():
    return FusedLayerNorm if fused_enabled() else nn.LayerNorm


def linear_class():
    return FusedLinear if fused_enabled() else nn.Linear


def mlp_class():
    return FusedMlp if fused_enabled() else Mlp


def cross_attention_class(base):
    """``base`` (a CrossAttentionBase subclass), or its fused variant."""
    return _fused_cross_attention(base) if fused_enabled() else base


# for the fused variants of method-specific blocks (BootMAE's decoder block)
fused_kernels = _kernels
