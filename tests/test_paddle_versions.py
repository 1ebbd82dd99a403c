"""What keeps the package working on every supported Paddle (2.6 to 3.x) and on the code path
a GPU takes: no ``argsort(stable=...)`` (2.6 has none), attention calls with only the
arguments the installed ``F.scaled_dot_product_attention`` has and in the form its fast
kernels accept, and PNG decoding that survives Paddle 2.6's zlib."""
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddle_cae.models import create_model, layers
from paddle_cae.models.bootmae import VisionTransformerForMaskedImageModeling
from paddle_cae.models.cae import ContextAutoencoderViT, split_visible_masked

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4)


@pytest.fixture
def no_stable_argsort(monkeypatch):
    """paddle.argsort as Paddle 2.6 has it: a ``stable`` keyword is a TypeError."""
    original = paddle.argsort

    def argsort(x, axis=-1, descending=False, name=None, **kwargs):
        if kwargs:
            raise TypeError(f"argsort() got an unexpected keyword argument {sorted(kwargs)[0]!r}")
        return original(x, axis=axis, descending=descending)

    monkeypatch.setattr(paddle, "argsort", argsort)


def test_pretraining_models_run_without_a_stable_argsort(no_stable_argsort):
    rng = np.random.default_rng(0)
    images = paddle.to_tensor(rng.standard_normal((2, 3, 32, 32)).astype("float32"))
    mae = create_model("mae_vit_base_patch16", decoder_embed_dim=32, decoder_depth=1,
                       decoder_num_heads=4, **SMALL)
    assert np.isfinite(float(mae(images)["loss"]))
    boot = VisionTransformerForMaskedImageModeling(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
        decode_dim=16, decoder_depth=1, fea_list=(0, 1), mask_num=12)
    order = np.stack([rng.permutation(16) for _ in range(2)]).astype("int64")
    assert np.isfinite(float(boot(images, idx_shuffle=order)["loss"]))
    cae = ContextAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4,
                                decoder_embed_dim=32, regressor_depth=1, decoder_depth=1,
                                decoder_num_heads=4, vocab_size=16)
    mask = np.zeros((2, 16), dtype=bool)
    mask[0, [1, 5, 9]] = mask[1, [0, 2, 15]] = True
    ids = paddle.to_tensor(rng.integers(0, 16, (2, 16)))
    assert np.isfinite(float(cae(images, paddle.to_tensor(mask), target_ids=ids)["loss"]))


def test_visible_and_masked_ids_keep_raster_order_with_many_ties(no_stable_argsort):
    # 1,000+ equal keys: where an unstable sort would scramble them
    rng = np.random.default_rng(1)
    mask = np.zeros((3, 1600), dtype=bool)
    for row in mask:
        row[rng.choice(1600, 700, replace=False)] = True
    visible, masked = split_visible_masked(paddle.to_tensor(mask))
    for b in range(3):
        np.testing.assert_array_equal(visible.numpy()[b], np.flatnonzero(~mask[b]))
        np.testing.assert_array_equal(masked.numpy()[b], np.flatnonzero(mask[b]))


def test_mae_restore_ids_invert_the_shuffle(no_stable_argsort):
    model = create_model("mae_vit_base_patch16", decoder_embed_dim=32, decoder_depth=1,
                         decoder_num_heads=4, **SMALL)
    noise = np.random.default_rng(2).random((2, 16)).astype("float32")
    x = paddle.randn([2, 16, 64])
    kept, mask, ids_restore = model.random_masking(x, 0.75, noise=noise)
    shuffle = np.argsort(noise, axis=1)
    np.testing.assert_array_equal(ids_restore.numpy(), np.argsort(shuffle, axis=1))
    np.testing.assert_array_equal(mask.numpy(), (np.argsort(shuffle, axis=1) >= 4).astype("float32"))
    np.testing.assert_array_equal(kept.numpy(), np.take_along_axis(x.numpy(), shuffle[:, :4, None], 1))


# ----------------------------------------------------------------------------- attention
@pytest.fixture
def sdpa_calls(monkeypatch):
    """Records the keyword arguments of every F.scaled_dot_product_attention call."""
    calls = []
    original = F.scaled_dot_product_attention

    def recorder(q, k, v, **kwargs):
        calls.append(dict(kwargs, head_dim=q.shape[-1], keys=k.shape[1]))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorder)
    monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "0")  # the path every GPU tensor takes
    return calls


FAMILIES = [
    # name, kwargs, (scale passed, bias given) per call in float32 with Paddle >= 3.3
    ("vit_base_patch16", dict(num_classes=10, **SMALL), False, False),
    ("mae_vit_base_patch16", dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
                                  **SMALL), False, False),
    ("cae_base_patch16_224", dict(num_classes=10, use_rel_pos_bias=True, **SMALL), False, True),
    ("bootmae_base_patch16_224", dict(num_classes=10, **SMALL), False, False),
]


@pytest.mark.parametrize("name,kwargs,scaled,biased", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_attention_calls_take_the_arguments_the_fast_kernels_accept(sdpa_calls, name, kwargs,
                                                                   scaled, biased):
    model = create_model(name, **kwargs)
    model.eval()
    model(paddle.randn([2, 3, 32, 32]))
    if not layers.SDPA_ANY_INPUT:
        # before Paddle 3.3 sdpa is flash attention only (half precision on a GPU): float32
        # attention is formed step by step
        assert sdpa_calls == []
        return
    assert sdpa_calls, "no attention went through F.scaled_dot_product_attention"
    for call in sdpa_calls:
        assert ("scale" in call) == scaled, call
        assert (call["attn_mask"] is not None) == biased, call
        assert call["training"] is False


def test_a_non_default_scale_is_passed_only_where_the_installed_paddle_takes_it(sdpa_calls):
    attn = layers.Attention(64, num_heads=4, qkv_bias=True, qk_scale=0.5, style="beit")
    attn.eval()
    attn(paddle.randn([2, 5, 64]))
    if layers.SDPA_ANY_INPUT:
        assert [c["scale"] for c in sdpa_calls] == [0.5]
    else:
        assert sdpa_calls == []


def test_vit_h_head_dim_80_keeps_the_reference_order_in_float32(sdpa_calls):
    model = create_model("vit_huge_patch14", num_classes=10, img_size=28, embed_dim=80, depth=1,
                         num_heads=1)
    model.eval()
    out = model(paddle.randn([1, 3, 28, 28]))
    assert sdpa_calls == []  # (q k^T) * 80 ** -0.5 does not round like sdpa's (q * s) k^T
    assert np.isfinite(out.numpy()).all()


def _fake_q(dtype, gpu):
    return SimpleNamespace(dtype=dtype, place=SimpleNamespace(is_gpu_place=lambda: gpu))


@pytest.mark.parametrize("any_input", [True, False])
def test_half_precision_attention_on_a_gpu_is_eligible_for_flash_attention(monkeypatch, any_input):
    monkeypatch.setattr(layers, "SDPA_ANY_INPUT", any_input)
    q = _fake_q(paddle.float16, gpu=True)
    # default scale, no bias: no ``scale`` keyword (it rules flash attention out)
    assert layers.sdpa_arguments(q, None, 80 ** -0.5, 80, False, True) == {
        **({"attn_mask": None} if any_input else {}), "training": True}
    if any_input:
        bias = object()
        assert layers.sdpa_arguments(q, bias, 0.125, 64, True, True)["attn_mask"] is bias
        assert layers.sdpa_arguments(q, None, 0.3, 64, True, False)["scale"] == 0.3
    else:
        assert layers.sdpa_arguments(q, object(), 0.125, 64, True, True) is None
        assert layers.sdpa_arguments(q, None, 0.3, 64, True, True) is None
        assert layers.sdpa_arguments(_fake_q(paddle.float16, gpu=False), None, 0.125, 64, True,
                                     True) is None
        assert layers.sdpa_arguments(_fake_q(paddle.float32, gpu=True), None, 0.125, 64, True,
                                     True) is None


@pytest.mark.parametrize("style,heads", [("timm", 4), ("beit", 4), ("timm", 1), ("beit", 1)])
def test_every_attention_path_gives_the_reference_output(style, heads, monkeypatch):
    monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "0")
    paddle.seed(3)
    attn = layers.Attention(80, num_heads=heads, qkv_bias=True, style=style,
                            window_size=(2, 2) if style == "beit" else None)
    if style == "beit":
        attn.relative_position_bias_table.set_value(
            paddle.randn(attn.relative_position_bias_table.shape))
    attn.eval()
    x = paddle.randn([2, 5, 80])
    np.testing.assert_allclose(attn.forward_sdpa(x).numpy(), attn.forward_explicit(x).numpy(),
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- images
@pytest.mark.slow
def test_png_decodes_after_the_package_and_paddle_are_imported():
    png = next((ROOT / "demo" / "digits" / "train").rglob("*.png"))
    code = ("import paddle_cae, paddle\nfrom PIL import Image\n"
            f"im = Image.open({str(png)!r}); im.load(); print(im.size)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=str(ROOT))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(32, 32)"


@pytest.mark.slow
def test_the_library_imports_without_paddles_ccache_warning():
    code = "from paddle_cae import load_checkpoint, create_model\nprint('imported')"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ccache" not in done.stderr, done.stderr[-2000:]


class _StopAtPrecision(Exception):
    pass


@pytest.mark.parametrize("entry,argv", [
    ("pretrain", ["--model", "mae_vit_base_patch16"]),
    ("finetune", []),
    ("linprobe", []),
])
@pytest.mark.parametrize("flags,expected", [([], "float16"), (["--amp_dtype", "bf16"], "bfloat16"),
                                            (["--amp", "false", "--amp_dtype", "bf16"], None)])
def test_entrypoints_train_in_the_amp_dtype_asked_for(monkeypatch, tmp_path, entry, argv, flags,
                                                      expected):
    from paddle_cae.cli import classify as classify_cli, pretrain as pretrain_cli

    seen = []

    def precision(dtype=None, *args, **kwargs):
        seen.append(dtype)
        raise _StopAtPrecision

    module = pretrain_cli if entry == "pretrain" else classify_cli
    monkeypatch.setattr(module, "Precision", precision)
    argv = argv + flags + ["--output_dir", str(tmp_path)]
    with pytest.raises(_StopAtPrecision):
        if entry == "pretrain":
            module.run(argv)
        else:
            module.run(argv, phase=entry)
    assert seen == [expected]
