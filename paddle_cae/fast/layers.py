"""The fast layers: subclasses of the reference layers (paddle_cae/models) with the same
parameters under the same names, computed by the fused CPU kernels (:mod:`paddle_cae.fast.kernels`).

A model is built from the reference layers; :func:`paddle_cae.fast.accelerate` then swaps each
layer's class for its fast subclass from :data:`FAST_CLASSES` (state dicts and optimizer state
are unchanged). Each fast layer asks one question, whether the kernels apply to this input
(float32 CPU tensors in dynamic graph mode, the extension built, and the layer's own
conditions), and otherwise runs the reference forward: GPU, AMP, ``paddle.jit.to_static`` /
export and machines without a compiler compute exactly what the reference layer computes.
(The reference forward is called as ``Base.forward(self, ...)``: Paddle 2.6's ``to_static``
cannot convert ``super()``.)
"""
import functools

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..models.bootmae import CrossAttention as BootCrossAttention, DecodeBlock
from ..models.cae import CrossAttention as CAECrossAttention, Decoder as CAEDecoder
from ..models.dalle import Conv2d, DalleEncoder, EncoderBlock
from ..models.layers import Block, DropPath, Mlp
from .kernels import block as block_ops, extension, tokenizer as tokenizer_ops

__all__ = ["FusedLayerNorm", "FusedLinear", "FusedMlp", "FusedBlock", "FusedDecodeBlock",
           "FusedCAECrossAttention", "FusedBootMAECrossAttention", "FastConv2d",
           "FastEncoderBlock", "FastDalleEncoder", "FAST_CLASSES", "fused_kernels"]


class _kernels:
    """The kernels for layers swapped in by ``accelerate`` (the environment switch was read
    then and is not read again; each op still checks dtype, place and graph mode and computes
    the reference formulation where the kernel does not apply)."""
    layer_norm = functools.partial(block_ops.layer_norm, by_env=False)
    bias_gelu = functools.partial(block_ops.bias_gelu, by_env=False)
    residual_bias = functools.partial(block_ops.residual_bias, by_env=False)
    residual_drop_path = functools.partial(block_ops.residual_drop_path, by_env=False)
    split_heads = functools.partial(block_ops.split_heads, by_env=False)
    scaled_softmax = functools.partial(block_ops.scaled_softmax, by_env=False)
    merge_heads = functools.partial(block_ops.merge_heads, by_env=False)
    heads = functools.partial(block_ops.heads, by_env=False)
    linear = functools.partial(block_ops.linear, by_env=False)
    channel_bias = functools.partial(tokenizer_ops.channel_bias, by_env=False)
    add_scaled = functools.partial(tokenizer_ops.add_scaled, by_env=False)

    @staticmethod
    def attention(q, k, v, scale):
        # looked up on each call: the FLOP counter (fast/flops.py) wraps it
        return block_ops.attention(q, k, v, scale, by_env=False)


class FusedLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters) computed by the LayerNorm kernel and its backward
    where the kernels apply; Paddle's own elsewhere."""

    def forward(self, x):
        if self.weight is not None and self.bias is not None and extension.applies(x):
            return _kernels.layer_norm(x, self.weight, self.bias, self._epsilon)
        return nn.LayerNorm.forward(self, x)  # (to_static on Paddle 2.6: no super())


class FusedLinear(nn.Linear):
    """``nn.Linear`` (same parameters) whose bias is added by the bias-add kernel where the
    kernels apply (its backward sums the bias gradient on all threads)."""

    def forward(self, x):
        if self.bias is not None and extension.applies(x):
            return _kernels.linear(x, self.weight, self.bias)
        return nn.Linear.forward(self, x)  # (to_static on Paddle 2.6: no super())


class FusedMlp(Mlp):
    """gelu(x W1 + b1) in one fused pass (same arithmetic, see kernels/block.py)."""

    def forward(self, x):
        if isinstance(self.drop, nn.Identity) and self.fc1.bias is not None \
                and extension.applies(x):
            h = _kernels.bias_gelu(paddle.matmul(x, self.fc1.weight), self.fc1.bias)
            return _kernels.linear(h, self.fc2.weight, self.fc2.bias)
        return Mlp.forward(self, x)  # not super(): Paddle 2.6's to_static cannot convert it


class FusedBlock(Block):
    """The block with the fused kernels: LayerNorm, bias + head split, scaled softmax
    (+ relative position bias), head merge, bias + (layer scale) + residual, bias + GELU. Same
    arithmetic as :class:`Block` up to float32 rounding. The attention's ``use_sdpa`` False
    (``PADDLE_CAE_ATTENTION=explicit``) keeps the step-by-step reference instead. The whole
    block is one fused unit: its sub-layers are swapped too, for the inputs it does not take."""

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
    return mlp.fc1.bias is not None and extension.applies(x)


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
    op falls back to the reference operators itself: the step-level ``if`` is inside them)."""

    def _heads(self, x):
        return _kernels.heads(x, self.num_heads)

    def _linear(self, x, weight, bias=None):
        return _kernels.linear(x, weight, bias)

    def softmax(self, attn):
        return _kernels.scaled_softmax(attn, 1.0)

    def merge_heads(self, x):
        return _kernels.merge_heads(x)


class FusedCAECrossAttention(_FusedCrossAttention, CAECrossAttention):
    __doc__ = CAECrossAttention.__doc__


class FusedBootMAECrossAttention(_FusedCrossAttention, BootCrossAttention):
    __doc__ = BootCrossAttention.__doc__


class FusedDecodeBlock(DecodeBlock):
    """BootMAE's decoder block on the kernels: LayerNorms, the self-attention core, bias +
    residual and bias + GELU (its cross-attention is swapped to the fused class on its own).
    Same arithmetic as :class:`DecodeBlock` up to float32 rounding."""

    def forward(self, x, fea):
        if not fused_block_applies(self, x):
            return DecodeBlock.forward(self, x, fea)
        k = _kernels
        x = k.residual_bias(x, fused_attention_branch(self, x), self.attn.proj.bias)
        x = x + self.c_attn(k.layer_norm(x, self.norm3.weight, self.norm3.bias, self.norm3._epsilon),
                            k.layer_norm(fea, self.norm4.weight, self.norm4.bias, self.norm4._epsilon))
        return k.residual_bias(x, fused_mlp_branch(self, x), self.mlp.fc2.bias)


# ------------------------------------------------------------ the frozen DALL-E tokenizer
class FastConv2d(Conv2d):
    """The tokenizer's convolution with its bias added by the multi-threaded channel-bias
    kernel where nothing needs a gradient."""

    def forward(self, x):
        if not extension.applies_without_gradient(x, self.w):
            return Conv2d.forward(self, x)
        return _kernels.channel_bias(F.conv2d(x, self.w, padding=self.padding), self.b)


class FastEncoderBlock(EncoderBlock):
    """``id_path(x) + post_gain * res_path(x)`` by the add-scaled kernel where nothing needs a
    gradient."""

    def forward(self, x):
        if not extension.applies_without_gradient(x):
            return EncoderBlock.forward(self, x)
        return _kernels.add_scaled(self.id_path(x), self.res_path(x), self.post_gain)


class FastDalleEncoder(DalleEncoder):
    """The tokenizer whose :meth:`get_codebook_indices` runs on the tokenizer kernels (im2col
    convolutions with MKL's sgemm, pooling and the argmax head) where they apply: float32 CPU
    images, dynamic graph, no gradient, MKL found."""

    @paddle.no_grad()
    def get_codebook_indices(self, images_mapped):
        self._check_input(images_mapped)
        ext = tokenizer_ops.tokenizer_kernels(images_mapped)
        if ext is None:
            return DalleEncoder.get_codebook_indices(self, images_mapped)
        return _tokenizer_codebook_indices(self, ext, images_mapped)


def _tokenizer_codebook_indices(self, ext, x):
    """:meth:`get_codebook_indices` on the CPU kernels (paddle_cae/fast): the same layers,
    activations channel-major [C, B, H, W], each ReLU done inside the convolution that
    follows it (or after the one before), bias and residual added in the product's tile."""
    first = self.blocks.input
    h = tokenizer_ops.tokenizer_conv(ext, x, first.w, first.b, nchw=True)
    for g in range(1, self.group_count + 1):
        for name, layer in getattr(self.blocks, f"group_{g}").named_children():
            if name == "pool":
                h = tokenizer_ops.tokenizer_pool(ext, h)
                continue
            ident = layer.id_path
            skip = h if isinstance(ident, nn.Identity) else \
                tokenizer_ops.tokenizer_conv(ext, h, ident.w, ident.b)
            convs = [getattr(layer.res_path, f"conv_{i}") for i in range(1, 5)]
            r = tokenizer_ops.tokenizer_conv(ext, h, convs[0].w, convs[0].b, relu_in=True,
                                             epilogue="relu")
            for conv in convs[1:3]:
                r = tokenizer_ops.tokenizer_conv(ext, r, conv.w, conv.b, epilogue="relu")
            h = tokenizer_ops.tokenizer_conv(ext, r, convs[3].w, convs[3].b, epilogue="residual",
                                             residual=skip, gain=layer.post_gain)
    head = self.blocks.output.conv
    return tokenizer_ops.tokenizer_argmax(ext, h, head.w, head.b)


# reference class -> fast subclass (same parameters, same names): what accelerate() swaps; a
# key (owner class, attribute name) swaps only that sub-layer (a Linear elsewhere stays Paddle's)
FAST_CLASSES = {
    (CAEDecoder, "head"): FusedLinear,
    nn.LayerNorm: FusedLayerNorm,
    Mlp: FusedMlp,
    Block: FusedBlock,
    DecodeBlock: FusedDecodeBlock,
    CAECrossAttention: FusedCAECrossAttention,
    BootCrossAttention: FusedBootMAECrossAttention,
    Conv2d: FastConv2d,
    EncoderBlock: FastEncoderBlock,
    DalleEncoder: FastDalleEncoder,
}

# fused_kernels: the kernels as the fast layers call them (by_env=False), for tests
fused_kernels = _kernels
