"""Tokenizer kernels (tokenizer.cc): the frozen DALL-E encoder's convolutions, pooling and
argmax head, without a backward (only where nothing needs a gradient). Every wrapper states its
Reference: the Paddle operators it replaces."""
from . import extension


def channel_bias(x, bias, *, by_env=True):
    """NCHW ``x + bias[c]`` (a convolution's bias). Reference: ``x + bias.reshape([1, C, 1, 1])``,
    the add ``F.conv2d`` does itself. Fused only where nothing needs a gradient (the frozen
    tokenizer)."""
    ext = extension._no_grad_use(x, bias, by_env=by_env)
    if ext is not None and x.ndim == 4:
        return ext.cae_channel_bias(x, bias)
    return x + bias.reshape([1, -1] + [1] * (x.ndim - 2))


def add_scaled(a, b, gain, *, by_env=True):
    """``a + gain * b``. Reference: exactly that. Fused only where nothing needs a gradient."""
    ext = extension._no_grad_use(a, b, by_env=by_env)
    if ext is not None and list(a.shape) == list(b.shape):
        return ext.cae_add_scaled(a, b, float(gain))
    return a + gain * b



# ----------------------------------------------------- frozen convolutional tokenizer
# Activations in the channel-major layout [C, B, H, W] (the kernels' im2col tiles gather from
# it); see tokenizer.cc. Only where nothing needs a gradient and MKL's sgemm was found.
_TOKENIZER_EPILOGUES = {"bias": 0, "relu": 1, "residual": 2}


def tokenizer_kernels(x):
    """The kernel module when the tokenizer kernels apply to images like ``x`` (float32 CPU,
    dynamic graph, built, MKL found, no gradient wanted), else None. The environment switch
    is not read: the tokenizer chose its variant when it was built."""
    ext = extension._no_grad_use(x, by_env=False)
    return ext if ext is not None and extension._has_gemm(ext, x) else None


def tokenizer_conv(ext, x, weight, bias, *, nchw=False, relu_in=False, epilogue="bias",
                   residual=None, gain=1.0):
    """A 'same'-padded, stride-1 convolution with the [O, C, k, k] ``weight`` (odd k) of
    ``x`` ([B, C, H, W] when ``nchw``, else [C, B, H, W]) into [O, B, H, W].

    Reference, in NCHW: ``t = F.conv2d(relu(x) if relu_in else x, weight, padding=(k-1)//2)
    + bias[c]``, then ``t`` ('bias'), ``relu(t)`` ('relu') or ``residual + gain * t``
    ('residual')."""
    res = residual if residual is not None else bias
    return ext.cae_tokenizer_conv(x, weight, bias, res, bool(nchw), bool(relu_in),
                                  _TOKENIZER_EPILOGUES[epilogue], float(gain))


def tokenizer_argmax(ext, x, weight, bias):
    """Token ids int64 [B, H*W] of x [C, B, H, W]: reference ``paddle.argmax(F.conv2d(relu(x),
    weight) + bias[c], axis=1)`` for 1x1 ``weight`` [V, C, 1, 1], flattened row-major."""
    return ext.cae_tokenizer_argmax(x, weight, bias)


def tokenizer_pool(ext, x):
    """2x2 max-pool with stride 2 of x [C, B, H, W]. Reference: ``F.max_pool2d(x, 2)`` per
    channel plane."""
    return ext.cae_tokenizer_pool(x)
