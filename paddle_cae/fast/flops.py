"""Counting the matrix-multiply FLOPs of a forward pass by tracing the shapes it uses.

While :func:`count_flops` is active, the functions every model of this package multiplies
matrices through are wrapped: ``F.linear`` (``nn.Linear`` and the explicit q/k/v projections),
the convolution kernel behind ``nn.Conv2D`` and ``F.conv2d``, ``paddle.matmul`` / ``paddle.bmm``
(attention scores and weighted values), ``F.scaled_dot_product_attention``, the fused CPU
attention core (``paddle_cae.fast.kernels.block.attention``) and the tokenizer's CPU convolutions
(``tokenizer_conv``, ``tokenizer_argmax``). One
multiply-add is 2 FLOPs; elementwise work (norms, activations, softmax) is not counted, as is
usual for model FLOP utilisation. A call made inside another counted call (the matmuls inside
scaled_dot_product_attention) is not counted twice.

Each counted product is filed as ``trainable`` when its output takes part in back-propagation
(``stop_gradient`` is False) and ``frozen`` otherwise (a tokenizer, a momentum teacher, a
frozen encoder, anything under ``paddle.no_grad``). A training step costs about three
forwards for the first kind (forward, gradient of the input, gradient of the weight) and one
for the second: :meth:`FlopCount.train_step` returns ``3 * trainable + frozen``.
"""
import contextlib
from collections import Counter
from dataclasses import dataclass, field

import paddle
import paddle.nn.functional as F


def _numel(shape):
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass
class FlopCount:
    trainable: int = 0
    frozen: int = 0
    by_kind: Counter = field(default_factory=Counter)

    @property
    def forward(self):
        return self.trainable + self.frozen

    def train_step(self):
        return 3 * self.trainable + self.frozen

    def add(self, kind, macs, out):
        flops = 2 * int(macs)
        # under no_grad nothing is back-propagated (a custom op's output may still say
        # stop_gradient False there)
        grad = isinstance(out, paddle.Tensor) and not out.stop_gradient and \
            paddle.is_grad_enabled()
        if grad:
            self.trainable += flops
        else:
            self.frozen += flops
        self.by_kind[kind] += flops


def _matmul_macs(x, y, transpose_x=False, transpose_y=False):
    xs, ys = list(x.shape), list(y.shape)
    if len(xs) == 1:
        xs = [1] + xs
    if len(ys) == 1:
        ys = ys + [1]
    if transpose_x:
        xs[-1], xs[-2] = xs[-2], xs[-1]
    if transpose_y:
        ys[-1], ys[-2] = ys[-2], ys[-1]
    m, k, n = xs[-2], xs[-1], ys[-1]
    batch_x, batch_y = xs[:-2], ys[:-2]
    nb = max(len(batch_x), len(batch_y))
    batch_x = [1] * (nb - len(batch_x)) + batch_x
    batch_y = [1] * (nb - len(batch_y)) + batch_y
    batch = _numel(max(a, b) for a, b in zip(batch_x, batch_y))
    return batch * m * k * n


@contextlib.contextmanager
def count_flops():
    """``with count_flops() as c: model(x)`` -> ``c.trainable``, ``c.frozen`` (FLOPs)."""
    import paddle.nn.functional.conv as conv_mod

    count = FlopCount()
    depth = [0]
    originals = []

    def patch(owner, name, macs_fn, kind):
        orig = getattr(owner, name)

        def wrapper(*args, **kwargs):
            outer = depth[0] == 0
            depth[0] += 1
            try:
                out = orig(*args, **kwargs)
            finally:
                depth[0] -= 1
            if outer:
                first = out[0] if isinstance(out, (tuple, list)) else out
                count.add(kind, macs_fn(out, *args, **kwargs), first)
            return out

        originals.append((owner, name, orig))
        setattr(owner, name, wrapper)

    def linear_macs(out, x, weight, *a, **k):
        return _numel(out.shape) * int(weight.shape[0])

    def conv_macs(out, x, weight, *a, **k):
        return _numel(out.shape) * _numel(weight.shape[1:])

    def matmul_macs(out, x, y, transpose_x=False, transpose_y=False, *a, **k):
        return _matmul_macs(x, y, transpose_x, transpose_y)

    def bmm_macs(out, x, y, *a, **k):
        return _matmul_macs(x, y)

    def sdpa_macs(out, q, k, v, *a, **kw):
        # [B, N, H, D] layout
        b, nq, h, d = q.shape
        nk, dv = k.shape[1], v.shape[-1]
        return int(b) * int(h) * int(nq) * int(nk) * (int(d) + int(dv))

    patch(F, "linear", linear_macs, "linear")
    patch(conv_mod, "_conv_nd", conv_macs, "conv")
    # F.conv2d calls the kernel directly in dygraph (not through _conv_nd): count it at the
    # public function too (the depth guard keeps a call from being counted twice)
    for name in ("conv1d", "conv2d", "conv3d"):
        patch(conv_mod, name, conv_macs, "conv")
        if getattr(F, name, None) is not None:
            patch(F, name, conv_macs, "conv")
    patch(paddle, "matmul", matmul_macs, "matmul")
    patch(paddle, "bmm", bmm_macs, "matmul")
    patch(F, "scaled_dot_product_attention", sdpa_macs, "attention")
    # the fused CPU attention core (fast/kernels/block.py): q, k, v [B, H, N, D], both products
    from .kernels import block as block_ops, tokenizer as tokenizer_ops

    def fused_attention_macs(out, q, k, v, *a, **kw):
        b, h, nq, d = q.shape
        return int(b) * int(h) * int(nq) * int(k.shape[2]) * (int(d) + int(v.shape[-1]))

    patch(block_ops, "attention", fused_attention_macs, "attention")

    # the frozen tokenizer's convolutions on the CPU kernels: out [O, B, H, W] (ids [B, H*W]
    # for the head) from weights [O, C, k, k]
    def tokenizer_conv_macs(out, ext, x, weight, *a, **kw):
        return conv_macs(out, x, weight)

    def tokenizer_head_macs(out, ext, x, weight, *a, **kw):
        return _numel(out.shape) * _numel(weight.shape)

    patch(tokenizer_ops, "tokenizer_conv", tokenizer_conv_macs, "conv")
    patch(tokenizer_ops, "tokenizer_argmax", tokenizer_head_macs, "conv")
    try:
        yield count
    finally:
        for owner, name, orig in reversed(originals):
            setattr(owner, name, orig)
