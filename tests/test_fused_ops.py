"""The fused CPU kernels (paddle_cae/fast) against their pure-Paddle reference formulations:
values and gradients agree to float32 rounding, and a ViT block gives the same loss and
gradients either way."""
import numpy as np
import paddle
import pytest

from paddle_cae.fast import accelerate
from paddle_cae.fast.kernels import block, extension as fused, optimizer, tokenizer
from paddle_cae.fast.layers import FusedBlock
from paddle_cae.fast.optim import FastGradientOps
from paddle_cae.models.registry import create_model
from paddle_cae.runtime import amp

pytestmark = pytest.mark.skipif(not fused.extension_available(),
                                reason="fused kernels could not be built here")

B, N, H, D = 2, 17, 3, 8
C = H * D


def run(fn, arrays, monkeypatch, enabled):
    monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "1" if enabled else "0")
    xs = [paddle.to_tensor(a, stop_gradient=False) for a in arrays]
    out = fn(*xs)
    out = out if isinstance(out, (tuple, list)) else (out,)
    rng = np.random.default_rng(1)
    loss = sum((o * paddle.to_tensor(rng.standard_normal(o.shape).astype("float32"))).sum()
               for o in out)
    loss.backward()
    return [o.numpy() for o in out], [x.grad.numpy() for x in xs]


CASES = {
    "split_heads_timm": (lambda a, b: block.split_heads(a, b, H, 1.0), [(B, N, 3 * C), (3 * C,)]),
    "split_heads_beit": (lambda a, b: block.split_heads(a, b, H, 0.3), [(B, N, 3 * C), (3 * C,)]),
    "merge_heads": (block.merge_heads, [(B, H, N, D)]),
    "softmax": (lambda a: block.scaled_softmax(a, 0.125), [(B, H, N, N)]),
    "softmax_bias": (lambda a, b: block.scaled_softmax(a, 0.3, b), [(B, H, N, N), (H, N, N)]),
    "bias_gelu": (block.bias_gelu, [(B, N, 4 * C), (4 * C,)]),
    "residual_bias": (block.residual_bias, [(B, N, C), (B, N, C), (C,)]),
    "residual_scale_bias": (block.residual_bias, [(B, N, C), (B, N, C), (C,), (C,)]),
    "layer_norm": (lambda x, w, b: block.layer_norm(x, w, b, 1e-6), [(B, N, C), (C,), (C,)]),
    "attention": (lambda q, k, v: block.attention(q, k, v, 0.3), [(B, H, N, D)] * 3),
    "heads": (lambda x: block.heads(x, H), [(B, N, C)]),
    "linear": (block.linear, [(B, N, C), (C, 2 * C), (2 * C,)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_op_matches_reference(name, monkeypatch):
    fn, shapes = CASES[name]
    rng = np.random.default_rng(0)
    arrays = [(2 * rng.standard_normal(s) + 0.5).astype("float32") for s in shapes]
    out_f, grad_f = run(fn, arrays, monkeypatch, True)
    out_r, grad_r = run(fn, arrays, monkeypatch, False)
    for a, b in zip(out_f + grad_f, out_r + grad_r):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("name,kwargs", [
    ("vit_base_patch16", {}),  # timm attention
    ("cae_base_patch16_224", {}),  # BEiT attention, q/v bias, relative position bias, gammas
    ("vit_base_patch16", {"drop_path_rate": 0.5}),  # drop path in training (same draws)
    ("cae_base_patch16_224", {"drop_path_rate": 0.5}),
])
def test_block_matches_reference(name, kwargs, monkeypatch):
    """The same weights on the fused layers (accelerate) and on the reference layers give the
    same loss and gradients."""
    x = paddle.randn([2, 3, 32, 32])
    results, state = [], None
    for enabled in (True, False):
        monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "1" if enabled else "0")
        model = create_model(name, img_size=32, embed_dim=24, depth=2, num_heads=3,
                             num_classes=5, **kwargs)
        accelerate(model)
        assert isinstance(model.blocks[0], FusedBlock) == enabled
        if state is None:
            for layer in model.sublayers():
                table = getattr(layer, "relative_position_bias_table", None)
                if table is not None:
                    table.set_value(paddle.randn(table.shape) * 0.1)
            state = {k: v.numpy() for k, v in model.state_dict().items()}
        else:
            model.set_state_dict(state)
        model.train()
        paddle.seed(7)  # the same drop-path draws in both
        loss = (model(x) ** 2).sum()
        loss.backward()
        grads = [p.grad.numpy().copy() for p in model.parameters() if p.grad is not None]
        results.append((float(loss), grads))
    assert len(results[0][1]) == len(results[1][1])
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max() + 1e-9)


def test_reference_path_outside_dygraph_or_cpu_float32(monkeypatch):
    monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "1")
    assert fused.usable(paddle.ones([2, 3]))
    assert not fused.usable(paddle.ones([2, 3], dtype="float64"))
    monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "0")
    assert not fused.usable(paddle.ones([2, 3]))


def test_adamw_kernel_matches_plain_path(monkeypatch):
    import math

    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(4096).astype("float32")
    grads = [0.01 * rng.standard_normal(4096).astype("float32") for _ in range(3)]
    lr, wd, b1, b2, eps = 1e-3, 0.05, 0.9, 0.999, 1e-8
    results = []
    for use_kernel in (True, False):
        p = paddle.to_tensor(p0)
        m, v = paddle.zeros_like(p), paddle.zeros_like(p)
        for t, g in enumerate(grads, 1):
            g = paddle.to_tensor(g)
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            if use_kernel:
                assert optimizer.adamw_update_(p, g, m, v, lr, wd, b1, b2, eps, bc1, bc2)
            else:
                p.scale_(1.0 - lr * wd)
                m.lerp_(g, 1.0 - b1)
                v.scale_(b2).add_(paddle.square(g).scale_(1.0 - b2))
                p.add_((m / (paddle.sqrt(v) / math.sqrt(bc2) + eps)).scale_(-lr / bc1))
        results.append((p.numpy(), m.numpy(), v.numpy()))
    (pk, mk, vk), (pr, mr, vr) = results
    np.testing.assert_array_equal(mk, mr)
    np.testing.assert_array_equal(vk, vr)
    # parameters: at most a few ulp apart (Paddle's CPU sqrt is not correctly rounded)
    np.testing.assert_allclose(pk, pr, rtol=1e-6, atol=1e-7)
    monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "0")
    assert not optimizer.adamw_update_(paddle.to_tensor(p0), paddle.to_tensor(grads[0]),
                                   paddle.zeros([4096]), paddle.zeros([4096]), lr, wd, b1, b2,
                                   eps, 0.1, 0.001)


def _ulp(x):
    return np.spacing(np.abs(x).astype(np.float32)).astype(np.float64)


def test_gelu_and_its_gradient_against_double_precision(monkeypatch):
    """The kernels' own vectorized normal CDF / exp: GELU within 1.5e-7 * |z| (+ 1 ulp) of the
    exact value over the whole float range that matters, its derivative within 3e-7."""
    from math import erf, exp, pi, sqrt

    monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "1")
    z = np.concatenate([np.linspace(-12, 12, 200001), np.linspace(-1e-3, 1e-3, 2001),
                        [-90.0, -40.0, 0.0, 40.0, 90.0]]).astype(np.float32)
    x = paddle.to_tensor(z.reshape(1, -1), stop_gradient=False)
    y = block.bias_gelu(x, paddle.zeros([z.size]))
    y.sum().backward()
    zd = z.astype(np.float64)
    cdf = np.array([0.5 * (1.0 + erf(v / sqrt(2.0))) for v in zd])
    pdf = np.array([exp(-0.5 * v * v) / sqrt(2.0 * pi) for v in zd])
    exact, dexact = zd * cdf, cdf + zd * pdf
    err = np.abs(y.numpy().ravel() - exact)
    assert np.all(err <= 1.5e-7 * np.abs(zd) + _ulp(exact)), zd[np.argmax(err - 1.5e-7 * np.abs(zd))]
    derr = np.abs(x.grad.numpy().ravel() - dexact)
    assert np.all(derr <= 3e-7 + _ulp(dexact)), zd[np.argmax(derr)]


def test_softmax_exp_against_double_precision(monkeypatch):
    """Entries of the fused softmax within 6 ulp of the exact softmax of the same float32
    inputs; those below the normal float range (e^-87.3) come out as 0 or within 2e-38."""
    monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "1")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-100, 5, (64, 197)), rng.uniform(-3, 3, (64, 197))])
    x = x.astype(np.float32).reshape(1, 2, 64, 197)
    y = block.scaled_softmax(paddle.to_tensor(x), 1.0).numpy().astype(np.float64)
    # the float32 differences x - max are the exp arguments in every implementation
    shifted = (x - x.max(-1, keepdims=True)).astype(np.float64)
    e = np.exp(shifted)
    exact = e / e.sum(-1, keepdims=True)
    normal = exact > 1.2e-38
    # (Paddle's own softmax: up to ~5 ulp on the same rows)
    assert np.all(np.abs(y - exact)[normal] <= 6 * _ulp(exact[normal]))
    assert np.all(np.abs(y - exact)[~normal] <= 2e-38)


def test_cdf_coefficients_in_the_kernel_source_are_the_generated_ones():
    """block.cc holds, to float32, the coefficients paddle_cae/fast/kernels/cdf_coefficients.py
    derives (Taylor series of erf; Chebyshev fit of erfc(a) exp(a^2))."""
    import os
    import re

    from paddle_cae.fast.kernels import cdf_coefficients

    with open(os.path.join(os.path.dirname(fused.__file__), "block.cc")) as f:
        source = f.read()
    body = source[source.index("inline float normal_cdf("):source.index("constexpr float kInv")]

    def horner(var, x):  # "float q = c;" then "q = q * a2 +/- c;" lines, highest power first
        pattern = rf"(?:float {var} = |{var} = {var} \* {x} )([+-]? ?[0-9.]+e[+-][0-9]+)f;"
        return [float(v.replace(" ", "")) for v in re.findall(pattern, body)][::-1]

    taylor, erfc_scaled = horner("q", "a2"), horner("R", "u")
    assert len(taylor) == 11 and len(erfc_scaled) == 11
    np.testing.assert_allclose(taylor, cdf_coefficients.taylor(), rtol=1e-7)
    np.testing.assert_allclose(erfc_scaled, cdf_coefficients.erfc_scaled(), rtol=1e-7, atol=1e-12)


def test_tokenizer_ops_are_bit_identical_and_only_used_without_gradients(monkeypatch):
    from paddle_cae.models.dalle import DalleEncoder

    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.standard_normal((2, 5, 6, 7)).astype("float32"))
    b = paddle.to_tensor(rng.standard_normal(5).astype("float32"))
    y = paddle.to_tensor(rng.standard_normal((2, 5, 6, 7)).astype("float32"))
    fused_out = [tokenizer.channel_bias(x, b).numpy(), tokenizer.add_scaled(x, y, 0.0625).numpy()]
    monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "0")
    reference = [tokenizer.channel_bias(x, b).numpy(), tokenizer.add_scaled(x, y, 0.0625).numpy()]
    for got, want in zip(fused_out, reference):
        np.testing.assert_array_equal(got, want)
    monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "1")
    # a tensor that needs a gradient takes the differentiable reference path
    x.stop_gradient = False
    tokenizer.add_scaled(x, y, 0.5).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.ones((2, 5, 6, 7), np.float32))
    # the whole tokenizer: the same tokens and logits either way
    paddle.seed(0)
    enc = DalleEncoder(group_count=2, n_hid=8, n_blk_per_group=1, vocab_size=16)
    for p in enc.parameters():  # non-zero biases
        p.set_value(paddle.to_tensor(rng.standard_normal(p.shape).astype("float32")))
    reference = DalleEncoder(group_count=2, n_hid=8, n_blk_per_group=1, vocab_size=16)
    reference.set_state_dict(enc.state_dict())
    accelerate(enc)
    assert type(enc.blocks.input).__name__ == "FastConv2d"
    img = paddle.rand([2, 3, 16, 16])
    with paddle.no_grad():
        logits_fused = enc(img).numpy()
        logits_ref = reference(img).numpy()
    np.testing.assert_array_equal(logits_fused, logits_ref)


def test_ema_kernel_is_bit_identical_to_the_paddle_expression(monkeypatch):
    rng = np.random.default_rng(0)
    ema0 = rng.standard_normal(5000).astype("float32")
    online = paddle.to_tensor(rng.standard_normal(5000).astype("float32"))
    keep = 0.9993
    ema = paddle.to_tensor(ema0)
    assert optimizer.ema_update_(ema, online, keep, 1.0 - keep)
    reference = paddle.to_tensor(ema0) * keep + online * (1.0 - keep)
    np.testing.assert_array_equal(ema.numpy(), reference.numpy())
    monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "0")
    untouched = paddle.to_tensor(ema0)
    assert not optimizer.ema_update_(untouched, online, keep, 1.0 - keep)
    np.testing.assert_array_equal(untouched.numpy(), ema0)


def test_the_switches_are_read_when_a_model_is_accelerated_not_in_its_forward(monkeypatch):
    from paddle_cae.fast import switches
    from paddle_cae.models.layers import CrossAttentionBase, Mlp
    from tests.test_cae import random_batch, tiny_cae

    monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "1")
    paddle.seed(0)
    model = accelerate(tiny_cae())
    block = model.regresser.regressor_blocks[0]
    assert isinstance(model.encoder.blocks[0], FusedBlock)
    assert type(block.mlp_cross) is not Mlp and isinstance(block.mlp_cross, Mlp)
    assert type(block.cross_attn).softmax is not CrossAttentionBase.softmax
    images, mask, ids = random_batch(model)
    with paddle.no_grad():
        before = model(images, mask, target_ids=ids)["loss"].numpy()

    def read(*_):
        raise AssertionError("an environment switch was read in a forward")

    for name in ("fused_ops", "explicit_attention", "attention_mode"):
        monkeypatch.setattr(switches, name, read)
    with paddle.no_grad():
        after = model(images, mask, target_ids=ids)["loss"].numpy()
    np.testing.assert_array_equal(before, after)


def test_switched_off_the_models_keep_the_reference_layers(monkeypatch):
    from paddle_cae.models.layers import Block, Mlp
    from tests.test_cae import tiny_cae

    monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "0")
    model = accelerate(tiny_cae())
    assert type(model.encoder.blocks[0]) is Block
    assert type(model.regresser.regressor_blocks[0].mlp_cross) is Mlp
    assert type(model.regresser.regressor_blocks[0].cross_attn).__name__ == "CrossAttention"


def test_attention_kernel_runs_on_the_wheels_mkl_and_matches_the_composed_kernels(monkeypatch):
    """Where the Paddle wheel ships MKL, the attention core runs as one kernel (per-head sgemm
    products around the softmax kernel) and gives what the composed ops give: matmul, scaled
    softmax kernel, matmul, head merge kernel."""
    import os

    monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "1")
    mkl = os.path.join(os.path.dirname(paddle.__file__), "libs", "libmklml_intel.so")
    rng = np.random.default_rng(3)
    q, k, v = (paddle.to_tensor(rng.standard_normal((2, 3, 11, 8)).astype("float32"),
                                stop_gradient=False) for _ in range(3))
    ext = fused._load()
    assert fused._has_gemm(ext, q) == os.path.isfile(mkl)
    if not os.path.isfile(mkl):
        pytest.skip("this Paddle wheel ships no MKL")
    out, prob = ext.cae_attention(q, k, v, 0.25)
    scores = block.scaled_softmax(paddle.matmul(q, k, transpose_y=True), 0.25)
    ref = block.merge_heads(paddle.matmul(scores, v))
    np.testing.assert_allclose(prob.numpy(), scores.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)
    g = paddle.to_tensor(rng.standard_normal(out.shape).astype("float32"))
    got = paddle.grad([out], [q, k, v], [g])
    want = paddle.grad([ref], [q, k, v], [g])
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_allocator_tuning_is_applied_with_the_kernels_and_can_be_switched_off():
    """Loading the kernels keeps freed tensor memory mapped (glibc mallopt); with
    PADDLE_CAE_MALLOC_TUNING=0 malloc is left alone."""
    import os
    import subprocess
    import sys

    code = ("from paddle_cae.fast.kernels import extension as fused; fused.extension_available(); "
            "print(fused.tune_allocator())")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    seen = {}
    for value in ("1", "0"):
        env = dict(os.environ, PYTHONPATH=root, PADDLE_CAE_MALLOC_TUNING=value,
                   PADDLE_CAE_FUSED_OPS="1")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        seen[value] = out.stdout.strip().splitlines()[-1]
    import platform

    assert seen["0"] == "False"
    assert seen["1"] == str(platform.libc_ver()[0] == "glibc")


def test_kernels_share_mkls_openmp_runtime_where_the_wheel_ships_it():
    """The kernels are linked to the OpenMP runtime of the wheel's MKL (libiomp5) when there is
    one, so that the process runs one thread pool, not two competing for the cores."""
    import os
    import shutil
    import subprocess

    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("no readelf here")
    lib = os.path.join(fused._build_dir(), fused._NAME, fused._NAME + ".so")
    assert os.path.isfile(lib), lib
    needed = subprocess.run([readelf, "-d", lib], capture_output=True, text=True).stdout
    iomp = os.path.isfile(os.path.join(os.path.dirname(paddle.__file__), "libs", "libiomp5.so"))
    assert ("[libiomp5.so]" in needed) == iomp
    assert ("[libgomp.so.1]" in needed) == (not iomp)


@pytest.mark.parametrize("with_gamma", [False, True])
def test_residual_drop_path_kernel_matches_the_droppath_formula(with_gamma, monkeypatch):
    """res + gamma * (h + bias) / keep * mask in one kernel: the forward and the gradients of
    res and h bit-identical to the reference operators, the column sums within rounding."""
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal(s).astype("float32") for s in [(3, 5, C), (3, 5, C), (C,)]]
    if with_gamma:
        arrays.append(rng.standard_normal(C).astype("float32"))
    mask = np.array([1.0, 0.0, 1.0], "float32").reshape(3, 1, 1)
    g = rng.standard_normal((3, 5, C)).astype("float32")
    results = []
    for enabled in (True, False):
        monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "1" if enabled else "0")
        xs = [paddle.to_tensor(a, stop_gradient=False) for a in arrays]
        gamma = xs[3] if with_gamma else None
        out = block.residual_drop_path(xs[0], xs[1], xs[2], gamma, paddle.to_tensor(mask), 0.9)
        grads = paddle.grad([out], xs, [paddle.to_tensor(g)])
        results.append([out.numpy()] + [t.numpy() for t in grads])
    (out_f, *grads_f), (out_r, *grads_r) = results
    np.testing.assert_array_equal(out_f, out_r)
    np.testing.assert_array_equal(grads_f[0], grads_r[0])  # res
    np.testing.assert_array_equal(grads_f[1], grads_r[1])  # h
    assert not grads_f[1][1].any()  # the dropped sample's branch gets no gradient
    for a, b in zip(grads_f[2:], grads_r[2:]):  # bias, gamma: sums over rows
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf])
def test_gradient_finiteness_check_in_one_kernel(bad, monkeypatch):
    """The loss scaler's check finds an inf / NaN in any gradient with the kernel (one call for
    all tensors) as the reference path does, and still unscales."""
    from paddle_cae.runtime.amp import found_inf_and_unscale_

    rng = np.random.default_rng(6)
    arrays = [rng.standard_normal(s).astype("float32") for s in [(5, 7), (300,), (2, 3, 4)]]
    if bad is not None:
        arrays[1][217] = bad
    results = []
    for enabled in ("1", "0"):
        monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", enabled)
        amp.use_gradient_ops(FastGradientOps() if enabled == "1" else None)
        grads = [paddle.to_tensor(a) for a in arrays]
        if enabled == "1":
            assert bool(optimizer.non_finite(grads).numpy()[0]) == (bad is not None)
        found = found_inf_and_unscale_(grads, scale=4.0)
        assert found.dtype == paddle.bool and list(found.shape) == [1]
        results.append((bool(found.numpy()[0]), [g.numpy() for g in grads]))
    assert results[0][0] == results[1][0] == (bad is not None)
    np.testing.assert_array_equal(results[0][1][0], arrays[0] / 4.0)
    if bad is None:  # (a skipped step's gradients are discarded: the multi-tensor op zeroes them)
        for a, b in zip(results[0][1], results[1][1]):
            np.testing.assert_array_equal(a, b)


def test_gradient_norm_from_one_kernel_matches_the_per_tensor_sums(monkeypatch):
    """The global gradient norm (clipping, logging) from the one-call squared sums agrees with
    Paddle's per-tensor float32 sums to float32 rounding."""
    from paddle_cae.runtime.amp import grad_norm_tensor

    rng = np.random.default_rng(8)
    shapes = [(64, 48), (3000,), (2, 3, 4), (1,)]
    arrays = [(rng.standard_normal(s) * 10.0 ** rng.integers(-3, 3)).astype("float32")
              for s in shapes]
    grads = [paddle.to_tensor(a) for a in arrays]
    sums = optimizer.sums_of_squares(grads).numpy()
    exact = np.array([np.sum(a.astype(np.float64) ** 2) for a in arrays])
    np.testing.assert_allclose(sums, exact, rtol=1e-6)
    norms = []
    for enabled in ("1", "0"):
        amp.use_gradient_ops(FastGradientOps() if enabled == "1" else None)
        params = [paddle.create_parameter(list(a.shape), "float32") for a in arrays]
        for p, a in zip(params, arrays):
            (p * paddle.to_tensor(a)).sum().backward()  # grad = a
        norms.append(float(grad_norm_tensor(params)))
    assert norms[0] == pytest.approx(norms[1], rel=1e-6)
    assert norms[0] == pytest.approx(float(np.sqrt(exact.sum())), rel=1e-6)


def _conv_reference(x, w, b, relu_in, epilogue, res=None, gain=1.0):
    """The reference formulation in NCHW with Paddle's own operators."""
    import paddle.nn.functional as F

    t = F.conv2d(F.relu(x) if relu_in else x, w, padding=(w.shape[-1] - 1) // 2)
    t = t + b.reshape([1, -1, 1, 1])
    if epilogue == "relu":
        return F.relu(t)
    if epilogue == "residual":
        return res + gain * t
    return t


def _gemm_kernels():
    ext = fused._load()
    if not fused._has_gemm(ext, paddle.zeros([1])):
        pytest.skip("this Paddle wheel ships no MKL")
    return ext


@pytest.mark.parametrize("k,relu_in,epilogue,nchw", [
    (3, True, "relu", False), (3, False, "bias", False), (1, False, "bias", False),
    (1, True, "residual", False), (1, False, "residual", False), (7, False, "bias", True),
    (3, True, "relu", True),
])
def test_tokenizer_conv_kernel_matches_paddles_convolution(k, relu_in, epilogue, nchw):
    """Every convolution form of the DALL-E encoder on the kernels, against F.conv2d + bias
    (+ ReLU / residual), on odd sizes whose rows do not fill the tiles evenly."""
    ext = _gemm_kernels()
    rng = np.random.default_rng(k)
    b_, c, o, h, w_ = 3, 5, 6, 9, 13
    x = rng.standard_normal((b_, c, h, w_)).astype("float32")  # NCHW
    wt = paddle.to_tensor((rng.standard_normal((o, c, k, k)) / k).astype("float32"))
    bias = paddle.to_tensor(rng.standard_normal(o).astype("float32"))
    res = rng.standard_normal((b_, o, h, w_)).astype("float32")
    want = _conv_reference(paddle.to_tensor(x), wt, bias, relu_in, epilogue,
                           paddle.to_tensor(res), 0.25).numpy()
    # the kernels' layout: channel-major [C, B, H, W]
    xin = paddle.to_tensor(x if nchw else x.transpose(1, 0, 2, 3).copy())
    res_cm = paddle.to_tensor(res.transpose(1, 0, 2, 3).copy()) if epilogue == "residual" else None
    got = tokenizer.tokenizer_conv(ext, xin, wt, bias, nchw=nchw, relu_in=relu_in,
                               epilogue=epilogue, residual=res_cm, gain=0.25).numpy()
    assert got.shape == (o, b_, h, w_)
    np.testing.assert_allclose(got.transpose(1, 0, 2, 3), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())


def test_tokenizer_pool_and_argmax_kernels_match_paddle():
    import paddle.nn.functional as F

    ext = _gemm_kernels()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 7, 10)).astype("float32")  # NCHW, an odd height
    pooled = tokenizer.tokenizer_pool(ext, paddle.to_tensor(x.transpose(1, 0, 2, 3).copy())).numpy()
    want = F.max_pool2d(paddle.to_tensor(x), kernel_size=2).numpy()
    np.testing.assert_array_equal(pooled.transpose(1, 0, 2, 3), want)

    v = 37
    wt = paddle.to_tensor(rng.standard_normal((v, 4, 1, 1)).astype("float32"))
    bias = paddle.to_tensor(rng.standard_normal(v).astype("float32"))
    logits = _conv_reference(paddle.to_tensor(x), wt, bias, True, "bias").numpy()
    ids = tokenizer.tokenizer_argmax(ext, paddle.to_tensor(x.transpose(1, 0, 2, 3).copy()), wt, bias)
    assert ids.dtype == paddle.int64 and list(ids.shape) == [2, 70]
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]).reshape(2, -1) > 1e-4  # no near-tie to break by rounding
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(ids.numpy()[clear], logits.argmax(1).reshape(2, -1)[clear])


def test_tokenizer_on_the_kernels_gives_the_reference_tokens_and_flop_count(monkeypatch):
    """get_codebook_indices of an encoder built with the kernels (release structure, small
    widths) equals the reference forward + argmax, and the FLOP counter sees the same frozen
    FLOPs on both paths."""
    from paddle_cae.models.dalle import DalleEncoder
    from paddle_cae.fast.flops import count_flops

    _gemm_kernels()
    paddle.seed(0)
    enc = accelerate(DalleEncoder(n_hid=8, n_blk_per_group=2, vocab_size=32))
    rng = np.random.default_rng(0)
    for name, p in enc.named_parameters():
        if name.endswith(".b"):
            p.set_value(paddle.to_tensor(0.1 * rng.standard_normal(p.shape).astype("float32")))
    img = paddle.rand([3, 3, 40, 48])
    calls = []
    monkeypatch.setattr(tokenizer, "tokenizer_argmax",
                        lambda *a, _f=tokenizer.tokenizer_argmax: calls.append(1) or _f(*a))
    with count_flops() as kernel_count:
        ids = enc.get_codebook_indices(img)
    assert calls, "the kernels were not used"
    with paddle.no_grad():
        logits = enc(img).numpy()  # the reference layers
    reference_enc = DalleEncoder(n_hid=8, n_blk_per_group=2, vocab_size=32)
    reference_enc.set_state_dict(enc.state_dict())
    with count_flops() as reference_count:
        reference_ids = reference_enc.get_codebook_indices(img)
    assert len(calls) == 1
    np.testing.assert_array_equal(ids.numpy(), reference_ids.numpy())
    np.testing.assert_array_equal(ids.numpy(), logits.argmax(1).reshape(3, -1))
    assert kernel_count.frozen == reference_count.frozen > 0
    assert kernel_count.trainable == reference_count.trainable == 0


def test_clipping_scales_all_gradients_in_one_kernel_call(monkeypatch):
    from paddle_cae.runtime.amp import clip_grads_

    rng = np.random.default_rng(2)
    grads0 = [rng.standard_normal(s).astype("float32") for s in ((5, 7), (13,), (3, 4, 2))]
    coef = paddle.to_tensor(np.float32(0.3712))
    ts = [paddle.to_tensor(g) for g in grads0]
    assert optimizer.scale_all_(ts, coef)
    for t, g in zip(ts, grads0):
        np.testing.assert_array_equal(t.numpy(), paddle.to_tensor(g).multiply_(coef).numpy())

    def clipped(enabled):
        amp.use_gradient_ops(FastGradientOps() if enabled else None)
        params = []
        for g in grads0:
            p = paddle.create_parameter(list(g.shape), "float32")
            (p * paddle.to_tensor(g)).sum().backward()  # p.grad = g
            params.append(p)
        norm = clip_grads_(params, 1.5)
        return float(norm), [p.grad.numpy() for p in params]

    norm_k, grads_k = clipped(True)
    norm_r, grads_r = clipped(False)
    np.testing.assert_allclose(norm_k, norm_r, rtol=1e-6)
    assert norm_k > 1.5
    for a, b in zip(grads_k, grads_r):
        np.testing.assert_allclose(a, b, rtol=2e-7, atol=1e-7)
    monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "0")
    assert not optimizer.scale_all_([paddle.to_tensor(grads0[0])], coef)


def test_layer_norms_of_models_run_on_the_kernel_with_the_same_values(monkeypatch):
    from paddle_cae.fast.layers import FusedLayerNorm

    monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "0")
    assert type(accelerate(paddle.nn.LayerNorm(6))) is paddle.nn.LayerNorm
    monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "1")
    norm = accelerate(paddle.nn.LayerNorm(6, epsilon=1e-6))
    assert isinstance(norm, FusedLayerNorm) and isinstance(norm, paddle.nn.LayerNorm)
    reference = paddle.nn.LayerNorm(6, epsilon=1e-6)
    rng = np.random.default_rng(4)
    for layer in (norm, reference):
        layer.weight.set_value(paddle.to_tensor(rng.standard_normal(6).astype("float32")))
        layer.bias.set_value(paddle.to_tensor(rng.standard_normal(6).astype("float32")))
    reference.set_state_dict(norm.state_dict())
    x = rng.standard_normal((3, 5, 6)).astype("float32")
    up = paddle.to_tensor(rng.standard_normal((3, 5, 6)).astype("float32"))
    results = []
    for layer in (norm, reference):
        xt = paddle.to_tensor(x, stop_gradient=False)
        y = layer(xt)
        (y * up).sum().backward()
        results.append([y.numpy(), xt.grad.numpy(), layer.weight.grad.numpy(),
                        layer.bias.grad.numpy()])
        layer.clear_gradients()
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_linear_under_an_autocast_is_the_reference_linear(monkeypatch):
    """Where the product is not float32 (an autocast), the bias is not added by the float32
    kernel: the same dtype and values as F.linear."""
    import paddle.nn.functional as F

    monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "1")
    rng = np.random.default_rng(6)
    x, w, b = (paddle.to_tensor(rng.standard_normal(s).astype("float32"))
               for s in ((4, 8), (8, 6), (6,)))
    try:
        with paddle.amp.auto_cast(level="O1", dtype="bfloat16"):
            got = block.linear(x, w, b)
            want = F.linear(x, w, b)
    except (RuntimeError, ValueError, NotImplementedError) as err:  # no bf16 matmul here
        pytest.skip(f"no bfloat16 autocast on this CPU build: {err}")
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got.astype("float32").numpy(), want.astype("float32").numpy())


def _count_kernel_calls(monkeypatch):
    """Wrap every op of the built extension so that its calls are counted by name."""
    import collections

    ext = fused._load()
    calls = collections.Counter()
    for name in dir(ext):
        if name.startswith("cae_"):
            def counted(*args, _name=name, _fn=getattr(ext, name)):
                calls[_name] += 1
                return _fn(*args)

            monkeypatch.setattr(ext, name, counted)
    return calls


def _method_models():
    """(name, tiny model, its training loss on a random batch) for every family."""
    from tests.test_bootmae import random_order, tiny as tiny_bootmae
    from tests.test_cae import random_batch, tiny_cae
    from tests.test_mae import tiny as tiny_mae

    vit = create_model("vit_base_patch16", img_size=32, embed_dim=24, depth=2, num_heads=3,
                       num_classes=5)
    images = paddle.randn([2, 3, 32, 32])
    cae = tiny_cae()
    return [
        ("vit", vit, lambda m: (m(images) ** 2).sum()),
        ("mae", tiny_mae(), lambda m: m(images)["loss"]),
        ("cae", cae, lambda m: m(*random_batch(m)[:2], target_ids=random_batch(m)[2])["loss"]),
        ("bootmae", tiny_bootmae(), lambda m: m(images, idx_shuffle=random_order(2, 16))["loss"]),
    ]


@pytest.mark.parametrize("index", range(4), ids=["vit", "mae", "cae", "bootmae"])
def test_accelerated_models_run_on_the_kernels(index, monkeypatch):
    """After accelerate() no layer with a fast subclass is left on its reference class, and a
    training step of every family calls the block kernels (no silent fall-back to the
    reference path)."""
    from paddle_cae.fast.layers import FAST_CLASSES

    paddle.seed(0)
    name, model, loss_of = _method_models()[index]
    accelerate(model, environ={"PADDLE_CAE_FUSED_OPS": "1"})
    left = [type(layer).__name__ for layer in model.sublayers() if type(layer) in FAST_CLASSES]
    assert not left, f"{name}: reference layers left after accelerate: {left}"
    model.train()
    calls = _count_kernel_calls(monkeypatch)
    loss_of(model).backward()
    for kernel in ("cae_layer_norm", "cae_split_heads", "cae_bias_gelu", "cae_residual"):
        used = sum(n for k, n in calls.items() if k.startswith(kernel))
        assert used > 0, f"{name}: {kernel}* not called ({dict(calls)})"


def test_accelerate_reaches_the_layers_a_model_holds_outside_its_sublayers():
    """BootMAE's teacher and CAE's attached tokenizer are kept out of the state dict; they are
    accelerated with the model (the teacher's blocks and the tokenizer run on the kernels)."""
    from paddle_cae.fast.layers import FastDalleEncoder
    from paddle_cae.models.dalle import DalleEncoder
    from tests.test_bootmae import tiny as tiny_bootmae
    from tests.test_cae import tiny_cae

    on = {"PADDLE_CAE_FUSED_OPS": "1"}
    bootmae = accelerate(tiny_bootmae(), environ=on)
    assert isinstance(bootmae.teacher.blocks[0], FusedBlock)
    cae = tiny_cae()
    cae.set_tokenizer(DalleEncoder(group_count=2, n_hid=8, n_blk_per_group=1,
                                   vocab_size=cae.vocab_size))
    accelerate(cae, environ=on)
    assert type(cae._tokenizer) is FastDalleEncoder
    assert not any(type(layer) is DalleEncoder for layer in cae.sublayers())
