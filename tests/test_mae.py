"""MAE pretraining model: sizes, masking, patch layout, loss, initialisation, conversion."""
import math

import numpy as np
import paddle
import pytest

from paddle_cae.convert import convert_state_dict, linear_weight_names
from paddle_cae.models import create_model, list_models, model_task
from paddle_cae.models.common import norm_eps_from
from paddle_cae.models.mae import MaskedAutoencoderViT
from paddle_cae.models.pos_embed import sincos_pos_embed


def tiny(**kwargs):
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
               decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    cfg.update(kwargs)
    return MaskedAutoencoderViT(**cfg)


def trainable_count(model):
    return sum(int(np.prod(p.shape)) for p in model.parameters() if not p.stop_gradient)


def torch_layout_state(model):
    """The model's state as an official checkpoint stores it (Linear weights [out, in])."""
    linear = linear_weight_names(model)
    return {k: (v.numpy().T if k in linear else v.numpy()) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ sizes
@pytest.mark.slow
def test_mae_base_pretrain_has_the_published_trainable_parameter_count():
    model = create_model("mae_vit_base_patch16")
    assert trainable_count(model) == 111_655_680


def test_mae_names_are_registered_as_pretraining_models():
    for name in ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"):
        assert name in list_models("pretrain")
        assert model_task(name) == "pretrain"


def test_decoder_is_512_wide_8_blocks_16_heads():
    model = create_model("mae_vit_base_patch16", depth=1)
    assert len(model.decoder_blocks) == 8
    assert model.decoder_blocks[0].attn.num_heads == 16
    assert model.decoder_embed.weight.shape == [768, 512]
    assert model.decoder_pred.weight.shape == [512, 16 * 16 * 3]


def test_pos_embeds_are_frozen_mae_layout_sincos_tables():
    model = tiny()
    for name, dim in (("pos_embed", 32), ("decoder_pos_embed", 16)):
        p = getattr(model, name)
        assert p.stop_gradient
        np.testing.assert_array_equal(p.numpy()[0], sincos_pos_embed(dim, 4, layout="mae"))
    assert "pos_embed" in model.state_dict() and "decoder_pos_embed" in model.state_dict()


def test_norm_layer_text_gives_the_layernorm_epsilon():
    assert norm_eps_from("partial(nn.LayerNorm, eps=1e-6)") == 1e-6
    assert norm_eps_from("nn.LayerNorm") == 1e-5
    assert norm_eps_from(None) == 1e-6
    assert tiny(norm_layer="partial(nn.LayerNorm, eps=1e-6)").norm._epsilon == 1e-6


# ---------------------------------------------------------------------------- masking
@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9])
def test_random_masking_keeps_exactly_int_n_times_one_minus_ratio(ratio):
    model = tiny(img_size=64)  # 8x8 = 64 patches
    x = paddle.randn([3, 64, 32])
    x_masked, mask, ids_restore = model.random_masking(x, ratio)
    keep = int(64 * (1 - ratio))
    assert x_masked.shape == [3, keep, 32]
    np.testing.assert_array_equal(mask.numpy().sum(1), [64 - keep] * 3)


def test_ids_restore_inverts_the_shuffle_and_small_noise_is_kept():
    model = tiny()
    noise = np.random.default_rng(0).random((2, 16)).astype("float32")
    x = paddle.to_tensor(np.arange(2 * 16, dtype="float32").reshape(2, 16, 1).repeat(32, axis=2))
    x_masked, mask, ids_restore = model.random_masking(x, 0.75, paddle.to_tensor(noise))
    shuffle = np.argsort(noise, axis=1)
    np.testing.assert_array_equal(np.argsort(shuffle, axis=1), ids_restore.numpy())
    np.testing.assert_array_equal(np.take_along_axis(shuffle, ids_restore.numpy(), 1),
                                  np.tile(np.arange(16), (2, 1)))
    kept = shuffle[:, :4]
    np.testing.assert_array_equal(x_masked.numpy()[:, :, 0], kept + 16 * np.arange(2)[:, None])
    expected_mask = np.ones((2, 16), "float32")
    np.put_along_axis(expected_mask, kept, 0.0, axis=1)
    np.testing.assert_array_equal(mask.numpy(), expected_mask)


def test_forward_takes_noise_from_the_caller():
    model = tiny()
    imgs = paddle.randn([2, 3, 32, 32])
    noise = paddle.rand([2, 16])
    a = model(imgs, noise=noise)
    b = model({"images": imgs, "noise": noise})
    np.testing.assert_array_equal(a["mask"].numpy(), b["mask"].numpy())
    np.testing.assert_allclose(a["loss"].numpy(), b["loss"].numpy(), rtol=1e-6)


# ---------------------------------------------------------------------- patches, loss
def test_patchify_orders_each_patch_row_col_channel_and_unpatchify_inverts():
    model = tiny()
    imgs = paddle.randn([2, 3, 32, 32])
    patches = model.patchify(imgs).numpy()
    assert patches.shape == (2, 16, 8 * 8 * 3)
    # patch (r=1, c=2) is token 1*4 + 2; its element (p=3, q=5, channel=1)
    np.testing.assert_allclose(patches[1, 6, (3 * 8 + 5) * 3 + 1],
                               imgs.numpy()[1, 1, 8 + 3, 16 + 5])
    np.testing.assert_array_equal(model.unpatchify(paddle.to_tensor(patches)).numpy(), imgs.numpy())


def test_loss_counts_removed_patches_only():
    model = tiny(norm_pix_loss=True)
    imgs = paddle.randn([2, 3, 32, 32])
    target = model.patchify(imgs).numpy()
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, ddof=1, keepdims=True)  # unbiased
    target = (target - mean) / np.sqrt(var + 1e-6)
    mask = np.zeros((2, 16), "float32")
    mask[:, :12] = 1
    pred = target.copy()
    pred[:, 12:] += 5.0  # errors on visible patches are ignored
    pred[:, :12] += 0.5
    loss = model.forward_loss(imgs, paddle.to_tensor(pred), paddle.to_tensor(mask))
    np.testing.assert_allclose(float(loss), 0.25, rtol=1e-5)


# ---------------------------------------------------------------------------- init
def test_initialisation_follows_the_official_scheme():
    paddle.seed(1)
    model = create_model("mae_vit_base_patch16", depth=2, decoder_depth=1)
    w = model.blocks[0].attn.qkv.weight.numpy()  # xavier over the fused [768, 2304] matrix
    limit = math.sqrt(6 / (768 + 2304))
    assert np.abs(w).max() <= limit and np.abs(w).max() > 0.99 * limit
    np.testing.assert_allclose(w.std(), limit / math.sqrt(3), rtol=0.02)
    assert not model.blocks[0].attn.qkv.bias.numpy().any()
    np.testing.assert_array_equal(model.blocks[0].norm1.weight.numpy(), 1.0)
    pw = model.patch_embed.proj.weight.numpy()
    np.testing.assert_allclose(pw.std(), math.sqrt(2 / (768 + 768)), rtol=0.02)
    pb = model.patch_embed.proj.bias.numpy()  # PyTorch's default conv bias init
    assert 0 < np.abs(pb).max() <= 1 / math.sqrt(768)
    for token in (model.cls_token, model.mask_token):
        np.testing.assert_allclose(token.numpy().std(), 0.02, rtol=0.2)


def test_encoder_export_and_reconstruction_image():
    model = tiny(norm_pix_loss=True)
    keys = set(model.encoder_state_dict())
    assert {"cls_token", "pos_embed", "norm.weight", "blocks.1.mlp.fc2.bias"} <= keys
    assert not any(k.startswith(("decoder", "mask_token")) for k in keys)
    batch = {"images": paddle.randn([2, 3, 32, 32])}
    image = model.reconstruction_image(batch, model(batch))
    assert image.shape == (32, 96, 3) and image.dtype == np.uint8


# ----------------------------------------------------------------------- conversion
def test_encoder_only_release_loads_with_the_decoder_reported_missing():
    source = tiny()
    official = {k: v for k, v in torch_layout_state(source).items()
                if not k.startswith(("decoder", "mask_token"))}
    official["head.weight"] = np.zeros((10, 32), "float32")  # fine-tuned files carry a head
    official["fc_norm.weight"] = np.ones(32, "float32")
    target = tiny()
    state, report = convert_state_dict(official, target)
    assert not report["mismatched"] and not report["unused"]
    assert set(report["dropped"]) == {"head.weight", "fc_norm.weight"}
    assert {k.split(".")[0] for k in report["missing"]} == {
        "mask_token", "decoder_pos_embed", "decoder_embed", "decoder_blocks", "decoder_norm",
        "decoder_pred"}
    target.set_state_dict(state)
    np.testing.assert_array_equal(target.blocks[1].attn.qkv.weight.numpy(),
                                  source.blocks[1].attn.qkv.weight.numpy())


def test_full_release_round_trips_through_the_converter():
    source = tiny()
    target = tiny()
    state, report = convert_state_dict(torch_layout_state(source), target)
    assert not report["missing"] and not report["unused"] and not report["mismatched"]
    target.set_state_dict(state)
    imgs, noise = paddle.randn([1, 3, 32, 32]), paddle.rand([1, 16])
    np.testing.assert_array_equal(target(imgs, noise=noise)["pred"].numpy(),
                                  source(imgs, noise=noise)["pred"].numpy())


# ----------------------------------------------------------------------- full size
@pytest.mark.slow
def test_mae_base_forward_backward_at_224_is_finite():
    paddle.seed(0)
    model = create_model("mae_vit_base_patch16")
    out = model(paddle.randn([2, 3, 224, 224]))
    assert out["pred"].shape == [2, 196, 768] and out["latent"].shape == [2, 50, 768]
    assert np.isfinite(float(out["loss"]))
    out["loss"].backward()
    assert model.pos_embed.grad is None and model.decoder_pos_embed.grad is None
    grad = model.blocks[0].attn.qkv.weight.grad
    assert grad is not None and np.isfinite(grad.numpy()).all()


def test_predicted_pixels_undo_the_norm_pix_target_with_the_true_patch_statistics():
    from paddle_cae.models.common import normalize_patches

    model = tiny(norm_pix_loss=True)
    imgs = paddle.randn([2, 3, 32, 32]) * 2 + 0.5
    target = normalize_patches(model.patchify(imgs), axis=-1, eps=1e-6, unbiased=True)
    np.testing.assert_allclose(model.predicted_pixels(imgs, target).numpy(), imgs.numpy(),
                               rtol=1e-5, atol=1e-5)
    plain = tiny(norm_pix_loss=False)
    np.testing.assert_array_equal(plain.predicted_pixels(imgs, target).numpy(),
                                  plain.unpatchify(target).numpy())
