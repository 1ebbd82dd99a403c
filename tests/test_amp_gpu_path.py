"""What the GPU code path does around mixed precision, checked on a CPU: the AMP state the
CAE tokenizer runs under, the ``--amp_dtype`` option, and the number of Python-issued
operators and host syncs of a training step (counted as ``repro/gpu_path/count_ops.py`` does).
"""
import collections
import contextlib

import numpy as np
import paddle
import pytest

from paddle_cae.models.common import fp32_region
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
        with fp32_region():
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


def test_the_cae_tokenizer_is_not_a_sublayer():
    """Its weights are neither saved with the model, broadcast by DataParallel nor trained."""
    from paddle_cae.models.dalle import dalle_encoder_tiny
    from tests.test_cae import tiny_cae

    model = tiny_cae(vocab_size=64)  # the tiny tokenizer's vocabulary
    before = set(model.state_dict())
    tokenizer = dalle_encoder_tiny()
    model.set_tokenizer(tokenizer)
    model.train()
    assert set(model.state_dict()) == before
    assert not [n for n, _ in model.named_sublayers() if "tokenizer" in n]
    assert not tokenizer.training and all(p.stop_gradient for p in tokenizer.parameters())


# ------------------------------------------------------------------------------ --amp_dtype
@pytest.mark.parametrize("phase", ["pretrain", "finetune", "linprobe"])
def test_amp_dtype_flag_selects_bf16_without_loss_scaling(phase):
    from paddle_cae.runtime.config import ConfigError
    from paddle_cae.cli.finetune_args import parse_finetune_args, parse_linprobe_args
    from paddle_cae.cli.pretrain_args import parse_pretrain_args

    parse = {"pretrain": parse_pretrain_args, "finetune": parse_finetune_args,
             "linprobe": parse_linprobe_args}[phase]
    default = parse([])
    assert default.amp_dtype == "float16" and amp_rt.amp_dtype_from_args(default) == "float16"
    for spelling in ("bfloat16", "bf16"):
        args = parse(["--amp_dtype", spelling])
        assert args.amp_dtype == "bfloat16"
        dtype = amp_rt.amp_dtype_from_args(args)
        precision = amp_rt.Precision(dtype, device_has_amp=True)
        assert precision.dtype == "bfloat16" and not precision.needs_loss_scaling
    assert amp_rt.Precision(amp_rt.amp_dtype_from_args(parse(["--amp_dtype", "fp16"])),
                            device_has_amp=True).needs_loss_scaling
    assert amp_rt.amp_dtype_from_args(parse(["--amp", "false", "--amp_dtype", "bf16"])) is None
    with pytest.raises((ConfigError, SystemExit)):
        parse(["--amp_dtype", "fp8"])


def test_bf16_stepper_has_no_loss_scale():
    from paddle_cae.engine.stepper import Stepper
    from paddle_cae.optim import AdamW

    layer = paddle.nn.Linear(3, 1)
    precision = amp_rt.Precision("bfloat16", device_has_amp=True)
    stepper = Stepper(layer, AdamW(layer.parameters(), lr=0.1), precision)
    assert not stepper.scaler.enabled
    info = stepper.backward(layer(paddle.ones([2, 3])).sum(), 0)
    assert info["stepped"] and info["loss_scale"] == 1.0


# --------------------------------------------------------- ops and host syncs of one step
class OpCounter:
    """Counts calls of ``paddle._C_ops`` functions (each one a kernel launch on a GPU) and of
    Tensor.item / numpy / tolist (host syncs), as repro/gpu_path/count_ops.py does."""

    def __init__(self, monkeypatch):
        from paddle import _C_ops

        self.ops = collections.Counter()
        self.syncs = collections.Counter()
        self.active = False
        for name in dir(_C_ops):
            fn = getattr(_C_ops, name)
            if callable(fn) and not name.startswith("_"):
                monkeypatch.setattr(_C_ops, name, self._wrap(self.ops, name, fn), raising=False)
        for name in ("item", "numpy", "tolist"):
            monkeypatch.setattr(paddle.Tensor, name,
                                self._wrap(self.syncs, name, getattr(paddle.Tensor, name)))

    def _wrap(self, counter, name, fn):
        def wrapped(*args, **kwargs):
            if self.active:
                counter[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    @contextlib.contextmanager
    def counting(self):
        self.ops.clear()
        self.syncs.clear()
        self.active = True
        try:
            yield self
        finally:
            self.active = False


def _stepper_costs(counter, n_layers, clip_grad, steps=2):
    from paddle_cae.engine.stepper import Stepper
    from paddle_cae.optim import build_optimizer, param_groups

    paddle.seed(0)
    layers = [paddle.nn.Linear(8, 8) for _ in range(n_layers)]
    model = paddle.nn.Sequential(*layers, paddle.nn.LayerNorm(8))
    opt = build_optimizer("adamw", param_groups(model, 0.05), lr=1e-3, weight_decay=0.05)
    precision = amp_rt.Precision("float16", device_has_amp=True)
    precision.autocast = contextlib.nullcontext  # CPU: loss scaling on, no fp16 kernels
    stepper = Stepper(model, opt, precision, clip_grad=clip_grad)
    x = paddle.randn([4, 8])
    results = []
    for _ in range(steps):
        loss = model(x).square().mean()
        with counter.counting():
            info = stepper.backward(loss, 0)
        assert info["stepped"]
        results.append((sum(counter.ops.values()), sum(counter.syncs.values()), dict(counter.ops)))
    return len(stepper.params), results[-1]


@pytest.mark.parametrize("clip_grad", [None, 3.0])
def test_a_training_step_has_no_per_tensor_loops_and_one_host_sync(monkeypatch, clip_grad):
    monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "0")  # the operators a GPU runs
    counter = OpCounter(monkeypatch)
    n_small, (ops_small, syncs_small, _) = _stepper_costs(counter, 2, clip_grad)
    n_big, (ops_big, syncs_big, detail) = _stepper_costs(counter, 20, clip_grad)
    assert syncs_small == syncs_big == 1  # the skip decision; grad norm and loss stay on device
    # the global gradient norm is the one per-tensor operator left (no multi-tensor norm in
    # Paddle); finiteness check, unscaling, clipping and AdamW are one call each
    per_tensor = (ops_big - ops_small) / (n_big - n_small)
    assert per_tensor <= 1.0, detail
    assert ops_big <= n_big + 30, detail
    # before: ~12 operators per tensor (3,114 for the 252 tensors of MAE ViT-B)


def test_logged_scalars_are_read_back_in_one_transfer(monkeypatch):
    from paddle_cae.engine.pretrain import scalar_parts

    counter = OpCounter(monkeypatch)
    outputs = {"loss": paddle.to_tensor(1.5), "loss_main": paddle.to_tensor(1.0),
               "mlm_acc": paddle.to_tensor(0.25), "logits": paddle.ones([4, 3]), "epoch": 2}
    with counter.counting():
        parts = scalar_parts(outputs, {"grad_norm": paddle.to_tensor(3.0)})
    assert parts == {"loss": 1.5, "loss_main": 1.0, "mlm_acc": 0.25, "epoch": 2.0,
                     "grad_norm": 3.0}
    assert sum(counter.syncs.values()) == 1
