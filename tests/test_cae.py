"""CAE pretraining model: size, full-size step, alignment target, checkpoint namings."""
import numpy as np
import paddle
import pytest

from paddle_cae.convert import convert_state_dict, linear_weight_names
from paddle_cae.models import create_model, list_models
from paddle_cae.models.cae import ContextAutoencoderViT, cae_official_key_map

CAE_B_TRAINABLE = 148_681_472  # SPEC: encoder 85,656,576 + regressor 28,368,384
#                                + decoder 34,655,744 + mask token 768


def trainable_count(model):
    return sum(int(np.prod(p.shape)) for p in model.parameters() if not p.stop_gradient)


def tiny_cae(**kwargs):
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
               decoder_embed_dim=32, regressor_depth=2, decoder_depth=1, decoder_num_heads=4,
               init_values=0.1, decoder_layer_scale_init_value=0.1, vocab_size=16)
    cfg.update(kwargs)
    return ContextAutoencoderViT(**cfg)


def random_batch(model, batch=2, num_masked=6, seed=0):
    rng = np.random.default_rng(seed)
    n = model.num_patches
    size = model.encoder.patch_embed.img_size
    mask = np.zeros((batch, n), dtype=bool)
    for i in range(batch):
        mask[i, rng.choice(n, num_masked, replace=False)] = True
    images = rng.standard_normal((batch, 3) + tuple(size)).astype(np.float32)
    ids = rng.integers(0, model.vocab_size, (batch, n))
    return paddle.to_tensor(images), paddle.to_tensor(mask), paddle.to_tensor(ids)


@pytest.fixture(scope="module")
def cae_base():
    paddle.seed(0)
    return create_model("cae_base_patch16_224_8k_vocab", drop_path_rate=0.1)


def test_cae_models_are_registered_for_pretraining():
    names = list_models("pretrain")
    for size in ("tiny", "small", "base", "large"):
        assert f"cae_{size}_patch16_224_8k_vocab" in names


@pytest.mark.slow
def test_cae_base_has_the_official_trainable_parameter_count(cae_base):
    assert trainable_count(cae_base) == CAE_B_TRAINABLE
    frozen = {n for n, p in cae_base.named_parameters() if p.stop_gradient}
    assert frozen == {"encoder.pos_embed", "rd_pos_embed"}


@pytest.mark.slow
def test_cae_base_forward_backward_at_224_is_finite(cae_base):
    cae_base.train()
    images, mask, ids = random_batch(cae_base, batch=2, num_masked=98)
    out = cae_base(images, mask, target_ids=ids)
    assert list(out["logits"].shape) == [2 * 98, 8192]
    assert list(out["latent_pred"].shape) == [2, 98, 768]
    for name in ("loss", "loss_main", "loss_align", "mlm_acc"):
        assert np.isfinite(float(out[name])), name
    out["loss"].backward()
    for name in ("encoder.blocks.0.attn.qkv.weight", "regresser.regressor_blocks.0.cross_attn.k.weight",
                 "decoder.head.weight", "mask_token"):
        grad = dict(cae_base.named_parameters())[name].grad
        assert grad is not None and np.isfinite(grad.numpy()).all(), name
    cae_base.clear_gradients()


def _grads(model):
    return {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}


def test_alignment_target_gets_no_gradient():
    paddle.seed(1)
    model = tiny_cae()
    model.train()
    images, mask, ids = random_batch(model)
    out = model(images, mask, target_ids=ids)
    assert out["latent_target"].stop_gradient
    out["loss_align"].backward()
    through_model = _grads(model)
    model.clear_gradients()

    # the same loss against the target as a constant: identical gradients, so nothing
    # flowed through the target branch
    constant = paddle.to_tensor(out["latent_target"].numpy())
    again = model(images, mask, target_ids=ids)
    loss = model.align_loss_weight * paddle.nn.functional.mse_loss(again["latent_pred"], constant)
    loss.backward()
    as_constant = _grads(model)
    assert sorted(through_model) == sorted(as_constant)
    for name, grad in through_model.items():
        np.testing.assert_allclose(grad, as_constant[name], rtol=1e-6, atol=1e-9, err_msg=name)


def test_ema_alignment_copy_is_frozen_and_not_counted():
    paddle.seed(2)
    current = tiny_cae()
    paddle.seed(2)
    ema = tiny_cae(alignment="ema", alignment_momentum=0.0)
    assert trainable_count(ema) == trainable_count(current)
    assert all(p.stop_gradient for p in ema.alignment_encoder.parameters())
    ema.train()
    images, mask, ids = random_batch(ema)
    out = ema(images, mask, target_ids=ids)
    out["loss"].backward()
    assert all(p.grad is None for p in ema.alignment_encoder.parameters())
    # with a copy equal to the encoder (momentum 0, no step yet) the target is the encoder's
    ref = current(images, mask, target_ids=ids)["latent_target"]
    np.testing.assert_allclose(out["latent_target"].numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)


def test_unequal_mask_counts_are_rejected():
    model = tiny_cae()
    images, mask, ids = random_batch(model)
    mask_np = mask.numpy()
    mask_np[0, np.flatnonzero(~mask_np[0])[0]] = True
    with pytest.raises(ValueError, match="same number"):
        model(images, paddle.to_tensor(mask_np), target_ids=ids)


def test_tokenizer_images_give_the_same_loss_as_target_ids():
    paddle.seed(3)
    model = tiny_cae()
    model.eval()
    images, mask, ids = random_batch(model)
    grid = model.encoder.patch_embed.grid_size

    class FixedTokenizer:
        def get_codebook_indices(self, x):
            return ids.reshape([ids.shape[0], *grid])

    model.set_tokenizer(FixedTokenizer())
    a = model(images, mask, tokenizer_images=images)
    b = model(images, mask, target_ids=ids)
    np.testing.assert_array_equal(a["labels"].numpy(), b["labels"].numpy())
    assert float(a["loss"]) == pytest.approx(float(b["loss"]))


# ------------------------------------------------------------------ checkpoint namings
def _to_official_layout(model):
    """Our state dict as a PyTorch-layout numpy dict (Linear weights [out, in])."""
    linear = linear_weight_names(model)
    return {k: (v.numpy().T if k in linear else v.numpy()) for k, v in model.state_dict().items()}


_TO_LXTGH = (
    ("regresser.regressor_blocks.", "pretext_neck.regressor_blocks."),
    ("decoder.decoder_blocks.", "pretext_neck.decoder_blocks."),
    ("regresser.norm.", "pretext_neck.norm."),
    ("decoder.norm.", "pretext_neck.norm2."),
    ("decoder.head.", "pretext_neck.head."),
    ("encoder_to_regresser_norm.", "encoder_to_decoder_norm."),
    ("encoder_to_regresser.", "encoder_to_decoder."),
)


def _lxtgh_state(model):
    state = {}
    for key, value in _to_official_layout(model).items():
        if key == "rd_pos_embed":
            continue  # built on the fly there, never saved
        for ours, theirs in _TO_LXTGH:
            if key.startswith(ours):
                key = theirs + key[len(ours):]
                break
        state[key] = value
        if key.startswith("encoder."):
            state["teacher." + key[len("encoder."):]] = value  # a stale copy, to be dropped
    return state


def _outputs(model, batch):
    model.eval()
    out = model(*batch[:2], target_ids=batch[2])
    return {k: out[k].numpy() for k in ("logits", "latent_pred", "latent_target", "loss")}


@pytest.mark.parametrize("decoder_embed_dim", [32, 48], ids=["same_width", "projected"])
def test_older_teacher_pretext_neck_checkpoint_loads_identically(decoder_embed_dim):
    paddle.seed(4)
    source = tiny_cae(decoder_embed_dim=decoder_embed_dim)
    paddle.seed(5)
    target = tiny_cae(decoder_embed_dim=decoder_embed_dim)
    old_state = _lxtgh_state(source)
    assert any(k.startswith("pretext_neck.norm2.") for k in old_state)
    assert any(k.startswith("teacher.") for k in old_state)

    state, report = convert_state_dict(old_state, target)
    assert report["missing"] == ["rd_pos_embed"]  # a fixed table the older code never saved
    assert not report["unused"] and not report["mismatched"]
    assert all(k.startswith("teacher.") for k in report["dropped"])
    target.set_state_dict(state)
    for name, value in source.state_dict().items():
        np.testing.assert_array_equal(target.state_dict()[name].numpy(), value.numpy(), err_msg=name)
    batch = random_batch(source)
    expected, got = _outputs(source, batch), _outputs(target, batch)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_current_checkpoint_alignment_copy_is_dropped():
    paddle.seed(6)
    model = tiny_cae()
    state = _to_official_layout(model)
    for key in list(state):
        if key.startswith("encoder."):
            state["alignment_encoder." + key[len("encoder."):]] = state[key]
    converted, report = convert_state_dict(state, tiny_cae())
    assert not report["missing"] and not report["unused"] and not report["mismatched"]
    assert report["dropped"] and all(k.startswith("alignment_encoder.") for k in report["dropped"])


@pytest.mark.parametrize("official,ours", [
    ("teacher_network.blocks.0.norm1.weight", None),
    ("regressor_and_decoder.blocks.1.norm1_q_cross.weight", "regresser.regressor_blocks.1.norm1_q.weight"),
    ("regressor_and_decoder.blocks.0.norm2_cross.bias", "regresser.regressor_blocks.0.norm2_cross.bias"),
    ("regressor_and_decoder.blocks.0.cross_attn.k.weight", "regresser.regressor_blocks.0.cross_attn.k.weight"),
    ("regressor_and_decoder.self_att_blocks.2.attn.qkv.weight", "decoder.decoder_blocks.2.attn.qkv.weight"),
    ("regressor_and_decoder.norm2.weight", "decoder.norm.weight"),
    ("regressor_and_decoder.norm.bias", "regresser.norm.bias"),
    ("regressor_and_decoder.head.bias", "decoder.head.bias"),
    ("encoder_to_decoder_norm.weight", "encoder_to_regresser_norm.weight"),
    ("module.mask_token", "mask_token"),
])
def test_passl_key_names_map_to_ours(official, ours):
    assert cae_official_key_map(official) == ours


def test_training_checkpoints_holding_the_old_tokenizer_sublayer_still_load():
    from paddle_cae.loading.pretrained import strict_load

    model = tiny_cae()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    state["_tokenizer.blocks.input.w"] = np.zeros((4, 3, 7, 7), dtype=np.float32)
    other = tiny_cae()
    strict_load(other, state, "old.pd")
    for key, value in other.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[key])
    state["decoder.unknown"] = np.zeros(3, dtype=np.float32)
    with pytest.raises(ValueError, match="unexpected 1"):
        strict_load(other, state, "old.pd")
