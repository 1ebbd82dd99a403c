"""Block kernels (block.cc): the transformer block's elementwise and attention operations,
each with its backward. Every wrapper states its Reference: the Paddle operators it replaces,
which it also computes where the kernel does not apply (see :mod:`.extension`)."""
import paddle
import paddle.nn.functional as F

from . import extension


def split_heads(qkv, bias, num_heads, q_scale=1.0, *, by_env=True):
    """qkv [B, N, 3*C] (the projection without its bias), bias [3*C] -> q, k, v [B, h, N, d].

    Reference: ``t = qkv + bias``; split in three along the last axis; each [B, N, h, d]
    transposed to [B, h, N, d]; ``q = q * q_scale`` (skipped when q_scale is 1)."""
    ext = extension._use(qkv, bias, by_env=by_env)
    if ext is not None:
        q, k, v = ext.cae_split_heads(qkv, bias, int(num_heads), float(q_scale))
        return q, k, v
    b, n, c3 = qkv.shape
    t = (qkv + bias).reshape([b, n, 3, num_heads, c3 // 3 // num_heads])
    q, k, v = (x.transpose([0, 2, 1, 3]) for x in t.unbind(2))
    if q_scale != 1.0:
        q = q * q_scale
    return q, k, v


def merge_heads(x, *, by_env=True):
    """[B, h, N, d] -> [B, N, h*d]. Reference: transpose then reshape."""
    ext = extension._use(x, by_env=by_env)
    if ext is not None:
        return ext.cae_merge_heads(x)
    b, h, n, d = x.shape
    return x.transpose([0, 2, 1, 3]).reshape([b, n, h * d])


def scaled_softmax(x, scale=1.0, bias=None, *, by_env=True):
    """softmax(x * scale [+ bias]) over the last axis; x [B, h, R, L], bias [h, R, L] or None.
    Reference: ``x * scale`` (skipped when scale is 1), ``+ bias``, ``F.softmax``."""
    ext = extension._use(x, by_env=by_env) if bias is None else \
        extension._use(x, bias, by_env=by_env)
    if ext is not None and x.ndim == 4:
        if bias is None:
            return ext.cae_scaled_softmax(x, float(scale))
        if list(bias.shape) == list(x.shape[1:]):
            return ext.cae_scaled_softmax_bias(x, bias, float(scale))
    if scale != 1.0:
        x = x * scale
    if bias is not None:
        x = x + bias
    return F.softmax(x, axis=-1)



def attention(q, k, v, scale=1.0, *, by_env=True):
    """softmax(q k^T * scale) v with the heads merged: q, k, v [B, h, N, d] -> [B, N, h*d].

    Reference: ``merge_heads(paddle.matmul(scaled_softmax(paddle.matmul(q, k,
    transpose_y=True), scale), v))``. The kernel forms each (batch, head) pair's two products
    with MKL's sgemm, one pair per thread; the softmax is the same kernel code."""
    ext = extension._use(q, k, v, by_env=by_env)
    if ext is not None and q.ndim == 4 and extension._has_gemm(ext, q):
        out, _ = ext.cae_attention(q, k, v, float(scale))
        return out
    scores = scaled_softmax(paddle.matmul(q, k, transpose_y=True), scale, by_env=by_env)
    return merge_heads(paddle.matmul(scores, v), by_env=by_env)


def heads(x, num_heads, *, by_env=True):
    """[B, N, h*d] -> [B, h, N, d]. Reference: reshape to [B, N, h, d], transpose to
    [B, h, N, d]."""
    ext = extension._use(x, by_env=by_env)
    if ext is not None and x.ndim == 3:
        return ext.cae_heads(x, int(num_heads))
    b, n, c = x.shape
    return x.reshape([b, n, num_heads, c // num_heads]).transpose([0, 2, 1, 3])


def linear(x, weight, bias=None, *, by_env=True):
    """``F.linear(x, weight, bias)`` (weight [in, out]); on the kernels ``x @ weight`` then
    the bias-add kernel, whose backward sums the bias gradient on all threads. Reference (also
    without a bias, and where the product is not float32): ``F.linear``."""
    if bias is not None and extension._use(x, weight, bias, by_env=by_env) is not None:
        y = paddle.matmul(x, weight)
        ext = extension._use(y, bias, by_env=by_env)  # (not float32 under an autocast)
        if ext is not None:
            return ext.cae_bias_add(y, bias)
    return F.linear(x, weight, bias)


def bias_gelu(h, bias, *, by_env=True):
    """gelu(h + bias), exact erf form. Reference: ``F.gelu(h + bias)``."""
    ext = extension._use(h, bias, by_env=by_env)
    if ext is not None:
        return ext.cae_bias_gelu(h, bias)
    return F.gelu(h + bias)


def residual_bias(res, h, bias, gamma=None, *, by_env=True):
    """``res + (h + bias)``, or ``res + gamma * (h + bias)`` with a layer-scale gamma."""
    ext = extension._use(res, h, bias, by_env=by_env) if gamma is None else \
        extension._use(res, h, bias, gamma, by_env=by_env)
    if ext is not None and list(res.shape) == list(h.shape):
        if gamma is None:
            return ext.cae_residual_bias(res, h, bias)
        return ext.cae_residual_scale_bias(res, h, bias, gamma)
    y = h + bias
    return res + (y if gamma is None else gamma * y)


_true_division = []


def _scalar_division_is_true_division():
    """Whether this Paddle computes ``tensor / python_float`` as a float32 division (3.x) or
    as a multiplication by the float32 reciprocal (2.6): decided once, by computing it."""
    if not _true_division:
        import numpy as np

        values = np.random.default_rng(0).standard_normal(4096).astype("float32")
        got = (paddle.to_tensor(values) / 0.9).numpy()
        _true_division.append(bool(np.array_equal(got, values / np.float32(0.9))))
    return _true_division[0]


def residual_drop_path(res, h, bias, gamma, mask, keep, *, by_env=True):
    """``res + drop_path(h + bias)`` (``gamma * (h + bias)`` with a layer scale) for a drawn
    per-sample ``mask`` [B, 1, ...] of 0 / 1 and keep probability ``keep``.

    Reference: ``y = h + bias; y = gamma * y; res + y / keep * mask``, the DropPath formula
    (models/layers.py)."""
    ext = extension._use(res, h, bias, mask, by_env=by_env) if gamma is None else \
        extension._use(res, h, bias, gamma, mask, by_env=by_env)
    if ext is not None and list(res.shape) == list(h.shape) and \
            int(mask.numel()) == int(h.shape[0]):
        args = (float(keep), float(1.0 / keep), _scalar_division_is_true_division())
        flat = mask.reshape([-1])
        if gamma is None:
            return ext.cae_residual_drop(res, h, bias, flat, *args)
        return ext.cae_residual_scale_drop(res, h, bias, gamma, flat, *args)
    y = h + bias
    y = y if gamma is None else gamma * y
    return res + y / keep * mask


def layer_norm(x, weight, bias, eps, *, by_env=True):
    """LayerNorm over the last axis. Reference: ``F.layer_norm``."""
    ext = extension._use(x, weight, bias, by_env=by_env)
    if ext is not None:
        y, _, _ = ext.cae_layer_norm(x, weight, bias, float(eps))
        return y
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
