"""Building blocks shared by every ViT in the package.

Parameter names follow the official PyTorch modules (``qkv``, ``q_bias``, ``gamma_1``,
``relative_position_bias_table``, ``mlp.fc1`` ...), so converting a checkpoint is a copy
plus the transposition of Linear weights (Paddle keeps them as [in, out]).

Two attention flavours exist in the reference code and both are kept exactly:
* ``"timm"`` (MAE): one ``qkv`` Linear with a full bias; scores are (q @ k^T) * scale.
* ``"beit"`` (CAE, BootMAE): ``qkv`` without bias plus ``q_bias``/``v_bias`` (no k bias);
  queries are scaled before the product; optional relative position bias.

This module is the reference formulation, plus the ``F.scaled_dot_product_attention`` ("sdpa")
call where it rounds like the reference.
"""
import inspect
import math

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .common import LN_EPS, drop_path_rates


# ----------------------------------------------------------------------------- init
def lazy_init_active():
    """True inside ``paddle.LazyGuard()``: parameters exist but hold no values, so
    custom initialisation must wait (used to count or shard large models cheaply)."""
    try:
        from paddle.nn.initializer.lazy_init import lazy_init_helper
    except ImportError:  # pragma: no cover - older Paddle
        return False
    return bool(lazy_init_helper().state)


def trunc_normal_(param, std=0.02, mean=0.0, a=None, b=None):
    """Fill ``param`` from N(mean, std) truncated to [a, b] (absolute bounds; default
    +-2 std). Inverse-CDF sampling, the same method PyTorch's trunc_normal_ uses."""
    a = mean - 2 * std if a is None else a
    b = mean + 2 * std if b is None else b

    def cdf(x):
        return 0.5 * (1.0 + math.erf((x - mean) / (std * math.sqrt(2.0))))

    lo, hi = 2 * cdf(a) - 1, 2 * cdf(b) - 1
    u = paddle.uniform(param.shape, dtype="float32", min=lo, max=hi)
    u = paddle.clip(u, -1 + 1e-7, 1 - 1e-7)
    x = paddle.erfinv(u) * (std * math.sqrt(2.0)) + mean
    param.set_value(paddle.clip(x, a, b).astype(param.dtype))


def normal_(param, std, mean=0.0):
    param.set_value(paddle.normal(mean, std, param.shape).astype(param.dtype))


def zeros_(param):
    param.set_value(paddle.zeros(param.shape, dtype=param.dtype))


def ones_(param):
    param.set_value(paddle.ones(param.shape, dtype=param.dtype))


def xavier_uniform_(param, fan_in=None, fan_out=None):
    """Xavier-uniform for a Paddle Linear weight ([in, out]) or a given fan."""
    shape = param.shape
    fan_in = shape[0] if fan_in is None else fan_in
    fan_out = shape[-1] if fan_out is None else fan_out
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    param.set_value(paddle.uniform(shape, dtype="float32", min=-limit, max=limit))


def init_linears_and_norms(root, init_linear_weight):
    """The reference ``_init_weights`` walk over ``root``'s sublayers, in their order: every
    Linear weight by ``init_linear_weight(name, weight)`` and its bias 0; LayerNorm 1 / 0."""
    for name, layer in root.named_sublayers():
        if isinstance(layer, nn.Linear):
            init_linear_weight(name, layer.weight)
            if layer.bias is not None:
                zeros_(layer.bias)
        elif isinstance(layer, nn.LayerNorm):
            ones_(layer.weight)
            zeros_(layer.bias)


def zero_parameter(layer, shape, trainable=True):
    p = layer.create_parameter(shape, default_initializer=nn.initializer.Constant(0.0))
    p.stop_gradient = not trainable
    return p


def add_qv_bias(layer, inner, enabled):
    """BEiT's ``q_bias`` and ``v_bias`` ([inner], zeros; no key bias), or both None."""
    if enabled:
        layer.q_bias = zero_parameter(layer, [inner])
        layer.v_bias = zero_parameter(layer, [inner])
    else:
        layer.q_bias = layer.v_bias = None


# ---------------------------------------------------------------------------- layers
class DropPath(nn.Layer):
    """Stochastic depth per sample: keep with probability 1 - p and rescale by 1/(1 - p)."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        return x / (1.0 - self.drop_prob) * self.sample_mask(x)

    def sample_mask(self, x):
        """[B, 1, ...] of 0 / 1: which samples keep their branch (one uniform draw each)."""
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        return paddle.floor((1.0 - self.drop_prob) + paddle.rand(shape, dtype=x.dtype))

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


class PatchEmbed(nn.Layer):
    """Image [B, C, H, W] -> patch tokens [B, N, D], raster order (row-major)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        img_size = _pair(img_size)
        patch_size = _pair(patch_size)
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2D(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"input image size {tuple(x.shape[2:])} does not match the model's "
                f"img_size {self.img_size}; build the model with --input_size {x.shape[2]}"
            )
        x = self.proj(x)  # [B, D, H/p, W/p]
        return x.flatten(2).transpose([0, 2, 1])  # [B, N, D]


class Mlp(nn.Layer):
    def __init__(self, in_features, hidden_features=None, out_features=None, drop=0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()  # exact erf form, as the reference
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def relative_position_index(grid_size):
    """[(N+1), (N+1)] index into a table of (2H-1)(2W-1)+3 rows (BEiT layout):
    patch pairs by (dy + H - 1) * (2W - 1) + (dx + W - 1); then cls->token row, token->cls
    column and cls->cls take the three extra entries L-3, L-2, L-1."""
    h, w = grid_size
    coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :]  # [2, N, N], query - key
    rel[0] += h - 1
    rel[1] += w - 1
    num_rel = (2 * h - 1) * (2 * w - 1) + 3
    index = np.zeros((h * w + 1, h * w + 1), dtype=np.int64)
    index[1:, 1:] = rel[0] * (2 * w - 1) + rel[1]
    index[0, :] = num_rel - 3
    index[:, 0] = num_rel - 2
    index[0, 0] = num_rel - 1
    return index


class Attention(nn.Layer):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0,
                 proj_drop=0.0, window_size=None, attn_head_dim=None, style="timm"):
        super().__init__()
        if style not in ("timm", "beit"):
            raise ValueError(f"attention style must be 'timm' or 'beit', got {style!r}")
        self.style = style
        self.num_heads = num_heads
        head_dim = attn_head_dim or dim // num_heads
        self.head_dim = head_dim
        inner = head_dim * num_heads
        self.inner_dim = inner
        self.scale = qk_scale or head_dim ** -0.5
        if style == "timm":
            self.qkv = nn.Linear(dim, inner * 3, bias_attr=None if qkv_bias else False)
            self.q_bias = self.v_bias = None
        else:
            self.qkv = nn.Linear(dim, inner * 3, bias_attr=False)
            add_qv_bias(self, inner, qkv_bias)
        self.window_size = tuple(window_size) if window_size else None
        if self.window_size:
            num_rel = (2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1) + 3
            self.relative_position_bias_table = zero_parameter(self, [num_rel, num_heads])
            self.register_buffer(
                "relative_position_index",
                paddle.to_tensor(relative_position_index(self.window_size)),
                persistable=False,
            )
        else:
            self.relative_position_bias_table = None
        self.attn_drop = nn.Dropout(attn_drop) if attn_drop > 0 else nn.Identity()
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        # False: the step-by-step reference (:meth:`forward_explicit`) for every input
        self.use_sdpa = True

    def qkv_projection(self, x):
        if self.q_bias is None:
            return self.qkv(x)
        return F.linear(x, self.qkv.weight, self.qkv_bias_vector())

    def relative_bias(self):
        """[heads, N+1, N+1] bias taken from the table by the fixed index."""
        n = self.relative_position_index.shape[0]
        bias = paddle.gather(self.relative_position_bias_table,
                             self.relative_position_index.flatten())  # [(N+1)^2, heads]
        return bias.reshape([n, n, self.num_heads]).transpose([2, 0, 1])

    def forward(self, x, rel_pos_bias=None):
        if self.use_sdpa and (not self.training or isinstance(self.attn_drop, nn.Identity)) \
                and (rel_pos_bias is None or self.relative_position_bias_table is None):
            return self.forward_sdpa(x, rel_pos_bias)
        return self.forward_explicit(x, rel_pos_bias)

    def forward_sdpa(self, x, rel_pos_bias=None):
        """The same arithmetic as :meth:`forward_explicit` with fewer memory passes: q, k, v
        are taken from the projection by one unbind (no 5-D transpose of qkv) and, where
        :func:`sdpa_arguments` allows it, ``F.scaled_dot_product_attention`` forms
        softmax((q * scale) k^T + bias) v in [B, N, h, d] layout (flash / memory-efficient
        attention on GPUs). Otherwise the products are formed here, in the reference order."""
        b, n, _ = x.shape
        qkv = self.qkv_projection(x).reshape([b, n, 3, self.num_heads, self.head_dim])
        q, k, v = qkv.unbind(2)  # each [B, N, h, d]
        bias = None
        if self.relative_position_bias_table is not None:
            bias = self.relative_bias().unsqueeze(0)
        if rel_pos_bias is not None:
            bias = rel_pos_bias
        # BEiT scales q before the product, as sdpa does; timm scales the scores after it,
        # which rounds the same only for a power-of-two scale (head_dim 64, 256, ...)
        same_rounding = self.style == "beit" or _is_power_of_two(self.scale)
        kwargs = sdpa_arguments(q, bias, self.scale, self.head_dim, same_rounding, self.training)
        if kwargs is not None:
            out = F.scaled_dot_product_attention(q, k, v, **kwargs)  # [B, N, h, d]
        else:
            q, k, v = (t.transpose([0, 2, 1, 3]) for t in (q, k, v))  # [B, h, N, d]
            attn = self.scores(q, k)  # [B, h, N, N]
            if bias is not None:
                attn = attn + bias
            out = paddle.matmul(F.softmax(attn, axis=-1), v).transpose([0, 2, 1, 3])
        return self.proj_drop(self.proj(out.reshape([b, n, self.inner_dim])))

    def scores(self, q, k):
        """Scaled q k^T, [B, h, N, d] each -> [B, h, N, N], in the reference order: timm scales
        the product, BEiT scales q before it."""
        if self.style == "timm":
            return paddle.matmul(q, k, transpose_y=True) * self.scale
        return paddle.matmul(q * self.scale, k, transpose_y=True)

    def qkv_bias_vector(self):
        """The bias added to the qkv projection ([3 * inner]; zeros when there is none)."""
        if self.q_bias is not None:
            zero_k = paddle.zeros_like(self.v_bias)
            zero_k.stop_gradient = True
            return paddle.concat([self.q_bias, zero_k, self.v_bias])
        if self.qkv.bias is not None:
            return self.qkv.bias
        bias = paddle.zeros([3 * self.inner_dim], dtype=self.qkv.weight.dtype)
        bias.stop_gradient = True
        return bias

    def forward_explicit(self, x, rel_pos_bias=None):
        """The reference formulation, step by step (kept for parity checks)."""
        b, n, _ = x.shape
        qkv = self.qkv_projection(x).reshape([b, n, 3, self.num_heads, self.head_dim])
        q, k, v = qkv.transpose([2, 0, 3, 1, 4]).unbind(0)  # each [B, h, N, d]
        attn = self.scores(q, k)  # [B, h, N, N]
        if self.relative_position_bias_table is not None:
            attn = attn + self.relative_bias().unsqueeze(0)
        if rel_pos_bias is not None:
            attn = attn + rel_pos_bias
        attn = self.attn_drop(F.softmax(attn, axis=-1))
        x = paddle.matmul(attn, v).transpose([0, 2, 1, 3]).reshape([b, n, self.inner_dim])
        return self.proj_drop(self.proj(x))


class Block(nn.Layer):
    """Pre-norm transformer block with optional layer-scale gammas (CAE)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0,
                 attn_drop=0.0, drop_path=0.0, init_values=None, window_size=None,
                 attn_head_dim=None, attn_style="timm", norm_eps=LN_EPS):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, epsilon=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop,
                              window_size, attn_head_dim, style=attn_style)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, epsilon=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        if init_values is not None and init_values > 0:
            init = nn.initializer.Constant(float(init_values))
            self.gamma_1 = self.create_parameter([dim], default_initializer=init)
            self.gamma_2 = self.create_parameter([dim], default_initializer=init)
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x, rel_pos_bias=None):
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x), rel_pos_bias))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), rel_pos_bias))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


def block_stack(depth, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0,
                attn_drop=0.0, drop_path_rate=0.0, **block_kwargs):
    """``depth`` transformer blocks, their drop-path rates rising linearly from 0 to
    ``drop_path_rate``; ``block_kwargs`` go to every block (init_values, window_size,
    attn_head_dim, attn_style, norm_eps)."""
    return nn.LayerList([
        Block(dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, rate, **block_kwargs)
        for rate in drop_path_rates(drop_path_rate, depth)
    ])


class CrossAttentionBase(nn.Layer):
    """Attention whose queries and keys/values come from different inputs, BEiT flavour:
    bias-less input projections (made by the subclass in ``_projections``, so that parameters
    are created in the reference order) plus ``q_bias``/``v_bias`` (no key bias); queries are
    scaled before the product. Inner width = heads * head_dim, may differ from ``dim``."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0,
                 proj_drop=0.0, attn_head_dim=None, **projection_args):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = attn_head_dim or dim // num_heads
        inner = self.head_dim * num_heads
        self.inner_dim = inner
        self.scale = qk_scale or self.head_dim ** -0.5
        self._projections(dim, inner, **projection_args)
        add_qv_bias(self, inner, qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop) if attn_drop > 0 else nn.Identity()
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def _projections(self, dim, inner, **kwargs):
        raise NotImplementedError

    def _linear(self, x, weight, bias=None):  # a projection (weight [in, out])
        return F.linear(x, weight, bias)

    def _heads(self, x):  # [B, N, h*d] -> [B, h, N, d]
        b, n, _ = x.shape
        return x.reshape([b, n, self.num_heads, self.head_dim]).transpose([0, 2, 1, 3])

    def attend(self, q, k, v):
        """Projected q [B, Nq, h*d], k and v [B, Nk, h*d] -> output [B, Nq, dim]."""
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        attn = paddle.matmul(q * self.scale, k, transpose_y=True)  # [B, h, Nq, Nk]
        attn = self.attn_drop(self.softmax(attn))
        out = self.merge_heads(paddle.matmul(attn, v))
        return self.proj_drop(self._linear(out, self.proj.weight, self.proj.bias))

    def softmax(self, attn):
        return F.softmax(attn, axis=-1)

    def merge_heads(self, x):  # [B, h, N, d] -> [B, N, h*d]
        b, h, n, d = x.shape
        return x.transpose([0, 2, 1, 3]).reshape([b, n, h * d])


class TorchBatchNorm1D(nn.Layer):
    """BatchNorm over features [B, C] with PyTorch's semantics, which linear probing
    relies on: batch statistics use the biased variance for normalising, while the
    running variance is updated with the UNBIASED one (Paddle's own BatchNorm updates it
    with the biased variance). ``momentum`` is PyTorch's (weight of the new value)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False):
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        if affine:
            self.weight = self.create_parameter([num_features],
                                                default_initializer=nn.initializer.Constant(1.0))
            self.bias = self.create_parameter([num_features],
                                              default_initializer=nn.initializer.Constant(0.0))
        else:
            self.weight = self.bias = None
        self.register_buffer("_mean", paddle.zeros([num_features]))
        self.register_buffer("_variance", paddle.ones([num_features]))
        # informational only (momentum is fixed), so it is not written to checkpoints
        self.register_buffer("num_batches_tracked", paddle.zeros([], dtype="int64"),
                             persistable=False)

    def forward(self, x):
        if self.training:
            mean = x.mean(axis=0)
            var = ((x - mean) ** 2).mean(axis=0)
            n = x.shape[0]
            with paddle.no_grad():
                unbiased = var * (n / max(n - 1, 1))
                self._mean.set_value((1 - self.momentum) * self._mean + self.momentum * mean)
                self._variance.set_value(
                    (1 - self.momentum) * self._variance + self.momentum * unbiased)
                self.num_batches_tracked.set_value(self.num_batches_tracked + 1)
        else:
            mean, var = self._mean, self._variance
        y = (x - mean) / paddle.sqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight + self.bias
        return y


# From Paddle 3.3 ``F.scaled_dot_product_attention`` takes ``scale`` and runs for every dtype,
# device and bias: flash attention where it applies (half precision, no ``scale`` argument,
# no bias), memory-efficient attention, else a plain math kernel. Before 3.3 (2.6, 3.0-3.2)
# it is flash attention only: half precision on a GPU, no bias, the default scale.
SDPA_ANY_INPUT = "scale" in inspect.signature(F.scaled_dot_product_attention).parameters


def sdpa_arguments(q, bias, scale, head_dim, same_rounding, training):
    """Keyword arguments for ``F.scaled_dot_product_attention(q, k, v, **kwargs)``, or None
    where attention must be formed step by step instead.

    q [B, N, h, d]; bias None or broadcastable to [B, h, N, N]. ``scale`` is passed only when
    it is not the default head_dim ** -0.5 (passing it rules flash attention out). In float32
    the call is made only where it rounds like the reference (``same_rounding``); in half
    precision (AMP on a GPU) the order of the scaling is below fp16's resolution anyway."""
    half = q.dtype in (paddle.float16, paddle.bfloat16)
    if not (same_rounding or half):
        return None
    default_scale = scale == head_dim ** -0.5
    if SDPA_ANY_INPUT:
        kwargs = {"attn_mask": bias, "training": training}
        if not default_scale:
            kwargs["scale"] = scale
        return kwargs
    if half and bias is None and default_scale and q.place.is_gpu_place():
        return {"training": training}
    return None


def _is_power_of_two(value):
    mantissa, _ = math.frexp(float(value))
    return value > 0 and mantissa == 0.5


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
