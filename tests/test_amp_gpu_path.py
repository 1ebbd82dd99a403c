"""What the GPU code path does around mixed precision, checked on a CPU: the AMP state the
CAE tokenizer runs under, the ``--amp_dtype`` option, and the number of Python-issued
operators and host syncs of a training step (counted as ``repro/gpu_path/count_ops.py`` does).
"""
import collections
import contextlib

import numpy as np
import paddle
import pytest

from paddle_cae.runtime import amp as amp_rt


@contextlib.contextmanager
def simulated_autocast(dtype="float16"):
    """Paddle ignores auto_cast on a CPU; set the tracer state a GPU autocast sets (O1, dtype)
    so that code which switches autocast off can be observed doing so."""
    from paddle.base import core

    tracer = amp_rt._tracer()
    saved = tracer._amp_level, tracer._amp_dtype
    tracer._amp_level, tracer._amp_dtype = core.AmpLevel.O1, dtype
    try:
        yield
    finally:
        tracer._amp_level, tracer._amp_dtype = saved


def test_amp_state_reads_the_autocast_level_and_dtype():
    assert amp_rt.amp_state() == ("O0", "float32")
    with simulated_autocast("bfloat16"):
        assert amp_rt.amp_state() == ("O1", "bfloat16")
        with amp_rt.fp32_region():
            assert amp_rt.amp_state()[0] == "O0"
        assert amp_rt.amp_state() == ("O1", "bfloat16")


def test_the_cae_tokenizer_runs_without_autocast_under_amp():
    from tests.test_cae import random_batch, tiny_cae

    paddle.seed(0)
    model = tiny_cae()
    model.train()
    images, mask, ids = random_batch(model)
    grid = model.encoder.patch_embed.grid_size
    seen = []

    class RecordingTokenizer(paddle.nn.Layer):
        def forward(self, x):
            seen.append((amp_rt.amp_state(), x.dtype))
            onehot = paddle.nn.functional.one_hot(ids.reshape([ids.shape[0], *grid]),
                                                  model.vocab_size)
            return onehot.transpose([0, 3, 1, 2]).astype("float32")  # logits [B, V, h, w]

    model.set_tokenizer(RecordingTokenizer())
    with simulated_autocast("float16"):
        outside = amp_rt.amp_state()
        labels = model.tokenize(images.astype("float16"))
        after = amp_rt.amp_state()
    assert outside == after == ("O1", "float16")  # autocast is back on after the tokenizer
    assert seen == [(("O0", "float32"), paddle.float32)]
    np.testing.assert_array_equal(labels.numpy(), ids.numpy())
