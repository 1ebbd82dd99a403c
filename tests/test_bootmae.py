"""BootMAE pretraining model: sizes, masks, loss switches, the momentum teacher and its
update, checkpoint round trip, conversion of official keys."""
import math

import numpy as np
import paddle
import pytest

from paddle_cae.convert import convert_state_dict, linear_weight_names
from paddle_cae.methods import get_method
from paddle_cae.models import create_model, list_models
from paddle_cae.models.bootmae import VisionTransformerForMaskedImageModeling, masks_from_shuffle
from paddle_cae.models.pos_embed import sincos_pos_embed

BOOTMAE = get_method("bootmae")


def tiny(**kwargs):
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
               decode_dim=16, decoder_depth=1, fea_list=(0, 1), mask_num=12)
    cfg.update(kwargs)
    return VisionTransformerForMaskedImageModeling(**cfg)


def trainable_count(model):
    return sum(int(np.prod(p.shape)) for p in model.parameters() if not p.stop_gradient)


def random_order(batch, n, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n) for _ in range(batch)]).astype(np.int64)


# ------------------------------------------------------------------------------ sizes
def test_bootmae_base_has_the_published_trainable_parameter_count():
    model = create_model("bootmae_base")
    assert trainable_count(model) == 115_373_251
    # pixel decoder of the base model: 12 heads of 512 // 12 = 42 channels -> inner width 504
    assert model.decode_blocks[0].attn.qkv.weight.shape == [512, 3 * 504]
    assert model.decode_blocks[0].c_attn.kv.weight.shape == [768, 2 * 504]
    assert model.lm_head.proj.weight.shape == [512, 3, 16, 16]


def test_bootmae_names_are_registered_as_pretraining_models():
    assert {"bootmae_base", "bootmae_large"} <= set(list_models("pretrain"))


def test_position_tables_are_frozen_moco_layout():
    model = tiny()
    for name, dim in (("pos_embed", 32), ("de_pos_embed", 16)):
        p = getattr(model, name)
        assert p.stop_gradient
        np.testing.assert_array_equal(p.numpy()[0], sincos_pos_embed(dim, 4, layout="moco"))


# ------------------------------------------------------------------------------ masks
def test_masks_from_shuffle_drop_exactly_the_last_mask_len_patches():
    order = paddle.to_tensor(random_order(3, 16))
    masks = masks_from_shuffle(order, 12, (4, 4), 8, weight_mask=True)
    m = masks["loss_mask"].numpy()
    np.testing.assert_array_equal(m.sum(1), [12, 12, 12])
    for b in range(3):
        assert not m[b, order.numpy()[b, :4]].any()
    w = masks["weight_mask"].numpy()
    assert (w[m == 0] == 0).all() and (w[m == 1] >= 1 + 1 / 9 - 1e-6).all() and (w <= 2).all()
    pix = masks["weight_mask_pixel"].numpy()
    assert pix.shape == (3, 1, 32, 32)
    np.testing.assert_array_equal(pix[:, 0, ::8, ::8].reshape(3, 16), w)


def test_weight_mask_counts_padding_in_the_3x3_average():
    order = paddle.to_tensor(np.arange(16, dtype=np.int64)[None])  # patches 4..15 dropped
    w = masks_from_shuffle(order, 12, (4, 4), 8)["weight_mask"].numpy().reshape(4, 4)
    np.testing.assert_allclose(w[3, 0], 1 + 4 / 9, rtol=1e-6)  # corner: 4 masked cells of 9
    np.testing.assert_allclose(w[2, 1], 1 + 9 / 9, rtol=1e-6)
    w_plain = masks_from_shuffle(order, 12, (4, 4), 8, weight_mask=False)["weight_mask"]
    np.testing.assert_array_equal(w_plain.numpy().reshape(4, 4)[1:], 1.0)


def test_pipeline_order_and_batch_roll_give_the_official_count():
    """The data pipeline's order (visible first) rolled once per batch by the method: exactly
    mask_num dropped, and the roll (0..3) turns up to 3 block patches visible and drops as many
    originally visible ones."""
    from paddle_cae.data.masking import bootmae_shuffle_from_mask
    from paddle_cae.methods import get_method

    model = tiny()
    mask = np.zeros((2, 4, 4), np.int64)
    mask[:, :3, :] = 1  # 12 block-masked patches
    order, _ = bootmae_shuffle_from_mask(mask, 12, rng=np.random.default_rng(3), roll=0)
    batch = get_method("bootmae").finish_batch({"images": paddle.randn([2, 3, 32, 32]),
                                                "order": order}, batch_seed=11)
    assert "order" not in batch
    dropped = model(batch)["mask"].numpy()
    np.testing.assert_array_equal(dropped.sum(1), [12, 12])
    moved = (dropped.reshape(2, 4, 4) != mask).sum((1, 2))
    assert moved[0] == moved[1] and moved[0] in (0, 2, 4, 6)


def test_forward_without_an_order_says_what_it_needs():
    with pytest.raises(ValueError, match="idx_shuffle"):
        tiny()(paddle.randn([2, 3, 32, 32]))


# ------------------------------------------------------------------------------ loss
def test_feature_loss_ramps_with_the_epoch_the_loop_passes_in():
    model = tiny(feature_weight=1.0, epochs=800)
    images, order = paddle.randn([2, 3, 32, 32]), random_order(2, 16)
    assert model(images, idx_shuffle=order)["feature_weight"] == 1.0  # no schedule given: constant
    out = model(images, idx_shuffle=order, **BOOTMAE.forward_kwargs(model, 9))
    assert out["feature_weight"] == pytest.approx(4 * 10 / 800)
    np.testing.assert_allclose(float(out["loss"]),
                               float(out["loss_pixel"]) + 0.05 * float(out["loss_feature"]),
                               rtol=1e-6)
    assert model(images, idx_shuffle=order, **BOOTMAE.forward_kwargs(model, 500))["feature_weight"] == 1.0
    assert model(images, idx_shuffle=order, feature_weight=0.25)["feature_weight"] == 0.25


def test_zero_feature_weight_skips_the_teacher():
    model = tiny(feature_weight=0.0)
    out = model(paddle.randn([2, 3, 32, 32]), idx_shuffle=random_order(2, 16))
    assert float(out["loss_feature"]) == 0.0 and out["target_feature"] is None
    assert float(out["loss"]) == float(out["loss_pixel"])


def test_tuple_and_dict_batches_carry_the_order():
    model = tiny()
    images, order = paddle.randn([2, 3, 32, 32]), random_order(2, 16)
    ref = float(model(images, idx_shuffle=order)["loss"])
    assert float(model((images, paddle.to_tensor(order)))["loss"]) == ref
    assert float(model({"images": images, "idx_shuffle": order})["loss"]) == ref


# --------------------------------------------------------------------------- teacher
def test_teacher_starts_as_a_copy_and_is_not_part_of_the_model():
    model = tiny()
    teacher = model.teacher
    student = model.state_dict()
    assert set(model.teacher_state_dict()) == {
        k for k in student
        if k.startswith(("patch_embed.", "blocks.")) or k in ("cls_token", "pos_embed")}
    for k, v in model.teacher_state_dict().items():
        np.testing.assert_array_equal(v.numpy(), student[k].numpy())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in model.parameters()}
    assert all(p.stop_gradient for p in teacher.parameters())
    assert not any(k.startswith(("teacher", "_teacher")) for k in student)


def test_teacher_receives_no_gradient_and_the_optimizer_leaves_it_alone():
    model = tiny()
    before = {k: v.numpy().copy() for k, v in model.teacher_state_dict().items()}
    opt = paddle.optimizer.AdamW(learning_rate=1e-2, parameters=model.parameters())
    out = model(paddle.randn([2, 3, 32, 32]), idx_shuffle=random_order(2, 16),
                **BOOTMAE.forward_kwargs(model, 400))
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.blocks[0].attn.qkv.weight.grad is not None
    opt.step()
    for k, v in model.teacher_state_dict().items():
        np.testing.assert_array_equal(v.numpy(), before[k], err_msg=k)


def test_teacher_does_not_change_the_students_global_parameter_names():
    with paddle.utils.unique_name.guard():
        plain = [p.name for p in tiny(with_teacher=False).parameters()]
        after_plain = paddle.utils.unique_name.generate("probe")
    with paddle.utils.unique_name.guard():
        with_teacher = [p.name for p in tiny().parameters()]
        after_teacher = paddle.utils.unique_name.generate("probe")
    assert plain == with_teacher
    assert after_plain == after_teacher  # layers built later keep their names too


def test_update_teacher_is_the_float32_ema_of_every_entry():
    model = tiny()
    with paddle.no_grad():
        for p in model.parameters():
            p.set_value(p + 0.1)
    student = {k: v.numpy() for k, v in model.state_dict().items()}
    before = {k: v.numpy().copy() for k, v in model.teacher_state_dict().items()}
    decay = 0.9995
    assert model.update_teacher(decay) == decay
    for k, v in model.teacher_state_dict().items():
        expected = before[k] * np.float32(decay) + np.float32(1 - decay) * student[k]
        np.testing.assert_array_equal(v.numpy(), expected.astype(np.float32), err_msg=k)


def test_the_method_gives_the_teacher_momentum_of_the_epoch():
    model = tiny(model_ema_decay=0.999, model_ema_dynamic=True)
    assert BOOTMAE.teacher_momentum(model, 250) == pytest.approx(0.999945)
    assert BOOTMAE.teacher_momentum(model, 0) == 0.999
    assert BOOTMAE.teacher_momentum(tiny(with_teacher=False), 0) is None  # nothing to update


def test_model_ema_decay_follows_the_official_schedule():
    static = tiny(model_ema_decay=0.999, model_ema_dynamic=False)
    dynamic = tiny(model_ema_decay=0.999, model_ema_dynamic=True)
    m = BOOTMAE.teacher_momentum
    assert m(static, 0) == 0.999
    assert m(static, 99) == pytest.approx(0.999891)
    assert m(static, 100) == m(static, 700) == 0.9999
    assert m(dynamic, 250) == pytest.approx(0.999945)
    assert m(dynamic, 400) == m(dynamic, 800) == pytest.approx(0.99999)
    assert create_model("bootmae_base", depth=1, decoder_depth=1, fea_list=(0,)).model_ema_dynamic


def test_teacher_state_survives_a_save_and_restore(tmp_path):
    model = tiny()
    with paddle.no_grad():  # make the teacher differ from a fresh model's
        model.teacher.cls_token.set_value(paddle.full([1, 1, 32], 3.0))
    path = str(tmp_path / "ckpt.pd")
    paddle.save({"model": model.state_dict(), "teacher": model.teacher_state_dict()}, path)
    restored = tiny()
    ckpt = paddle.load(path)
    restored.set_state_dict(ckpt["model"])
    restored.set_teacher_state_dict(ckpt["teacher"])
    for k, v in model.teacher_state_dict().items():
        np.testing.assert_array_equal(restored.teacher_state_dict()[k].numpy(), v.numpy())
    with pytest.raises(KeyError):
        restored.set_teacher_state_dict({"cls_token": ckpt["teacher"]["cls_token"]})


# ---------------------------------------------------------------------- engine hooks
def test_batch_order_is_rolled_alike_for_one_batch_seed():
    from paddle_cae.methods import get_method
    from paddle_cae.methods.bootmae import roll_for_batch

    method = get_method("bootmae")
    order = random_order(2, 16)
    first = method.finish_batch({"images": None, "order": order}, 1234)["idx_shuffle"]
    again = method.finish_batch({"images": None, "order": paddle.to_tensor(order)}, 1234)["idx_shuffle"]
    np.testing.assert_array_equal(first, again.numpy())
    roll = roll_for_batch(1234)
    np.testing.assert_array_equal(first, np.roll(order, roll, axis=1))
    assert {roll_for_batch(seed) for seed in range(200)} == {0, 1, 2, 3}


def test_update_teacher_at_the_methods_momentum_is_one_ema_step():
    model = tiny(model_ema_decay=0.99)
    with paddle.no_grad():
        model.cls_token.set_value(paddle.ones([1, 1, 32]))
    before = model.teacher.cls_token.numpy().copy()
    model.update_teacher(BOOTMAE.teacher_momentum(model, 0))
    np.testing.assert_allclose(model.teacher.cls_token.numpy(),
                               before * np.float32(0.99) + np.float32(1 - 0.99), rtol=1e-6)


def test_extra_state_carries_the_teacher():
    model = tiny()
    with paddle.no_grad():
        model.teacher.cls_token.set_value(paddle.full([1, 1, 32], 2.0))
    extra = model.extra_state()
    assert all(isinstance(v, np.ndarray) for v in extra["teacher"].values())
    other = tiny()
    other.load_extra_state(extra)
    np.testing.assert_array_equal(other.teacher.cls_token.numpy(), 2.0)


def test_encoder_export_and_reconstruction_image():
    model = tiny()
    keys = set(model.encoder_state_dict())
    assert "norm.weight" in keys and "blocks.1.attn.qkv.weight" in keys and "cls_token" in keys
    assert not any(k.startswith(("decode", "down", "lm_head", "mask_token")) for k in keys)
    batch = {"images": paddle.randn([2, 3, 32, 32]), "idx_shuffle": random_order(2, 16)}
    image = model.reconstruction_image(batch, model(batch))
    assert image.shape == (32, 96, 3) and image.dtype == np.uint8


# ------------------------------------------------------------------------ conversion
def test_official_model_ema_loads_into_the_teacher_and_drops_the_rest():
    source = tiny()
    linear = linear_weight_names(source)
    official = {k: (v.numpy().T if k in linear else v.numpy())
                for k, v in source.state_dict().items()}
    target = tiny()
    state, report = convert_state_dict(official, target.teacher)
    assert not report["missing"] and not report["mismatched"] and not report["unused"]
    assert "norm.weight" in report["dropped"] and "lm_head_1.weight" in report["dropped"]
    target.set_teacher_state_dict(state)
    state, report = convert_state_dict(official, target)
    assert not report["missing"] and not report["unused"]
    target.set_state_dict(state)
    images, order = paddle.randn([1, 3, 32, 32]), random_order(1, 16)
    np.testing.assert_array_equal(target(images, idx_shuffle=order)["loss"].numpy(),
                                  source(images, idx_shuffle=order)["loss"].numpy())


# ---------------------------------------------------------------------------- init
def _uniform(values, bound, rtol=0.03):
    """``values`` drawn from U(-bound, bound): inside the bound, reaching close to it, with the
    uniform's std bound / sqrt(3)."""
    values = np.asarray(values, dtype=np.float64)
    assert np.abs(values).max() <= bound * (1 + 1e-6)
    assert np.abs(values).max() > 0.97 * bound
    np.testing.assert_allclose(values.std(), bound / math.sqrt(3), rtol=rtol)


def test_initialisation_follows_the_official_pretraining_scheme():
    # the official pretraining model (modeling_pretrain_bootmae): Q, K and V each xavier-uniform
    # (bound from a third of the fused output), every other Linear xavier-uniform with a zero
    # bias, the patch projection xavier-uniform over its flattened 3*p*p inputs, the pixel
    # head's transposed convolution left at PyTorch's default U(+-1/sqrt(3*p*p)), mask tokens
    # truncated at +-1 std of 0.02, the class token N(0, 1e-6), no depth rescaling
    paddle.seed(3)
    model = create_model("bootmae_base", depth=2, fea_list=(0, 1), decoder_depth=1)
    dim, patch = 768, 16
    linears = [(name, layer) for name, layer in model.named_sublayers()
               if isinstance(layer, paddle.nn.Linear)]
    assert len(linears) >= 15
    for name, layer in linears:
        fan_in, fan_out = layer.weight.shape  # Paddle's Linear weight is [in, out]
        if name.endswith("qkv"):
            bound = math.sqrt(6.0 / (fan_out // 3 + fan_in))
        else:
            bound = math.sqrt(6.0 / (fan_in + fan_out))
        _uniform(layer.weight.numpy(), bound)
        if layer.bias is not None:
            assert not layer.bias.numpy().any(), name
    for name, param in model.named_parameters():
        if name.endswith(("q_bias", "v_bias")):
            assert not param.numpy().any(), name
    for name, layer in model.named_sublayers():
        if isinstance(layer, paddle.nn.LayerNorm):
            np.testing.assert_array_equal(layer.weight.numpy(), 1.0)
            assert not layer.bias.numpy().any(), name
    _uniform(model.patch_embed.proj.weight.numpy(), math.sqrt(6.0 / (3 * patch * patch + dim)))
    assert not model.patch_embed.proj.bias.numpy().any()
    head_bound = 1.0 / math.sqrt(3 * patch * patch)
    _uniform(model.lm_head.proj.weight.numpy(), head_bound)
    head_bias = model.lm_head.proj.bias.numpy()
    assert np.abs(head_bias).max() <= head_bound and head_bias.any()
    truncated_std = 0.02 * math.sqrt(1 - 2 * 0.24197072 / 0.68268949)  # N(0, 1) cut at +-1
    for token in (model.mask_token, model.mask_token_1):
        values = token.numpy()
        assert np.abs(values).max() <= 0.02
        np.testing.assert_allclose(values.std(), truncated_std, rtol=0.12)
    np.testing.assert_allclose(model.cls_token.numpy().std(), 1e-6, rtol=0.15)
    # no depth rescaling: the last block's output projections reach the same bound as the first
    for block in (model.blocks[0], model.blocks[-1]):
        assert np.abs(block.attn.proj.weight.numpy()).max() > 0.97 * math.sqrt(6.0 / (2 * dim))
        assert np.abs(block.mlp.fc2.weight.numpy()).max() > 0.97 * math.sqrt(6.0 / (5 * dim))


# ------------------------------------------------------------------------- full size
@pytest.mark.slow
def test_bootmae_base_forward_backward_at_224_is_finite():
    from paddle_cae.data.masking import bootmae_mask_generator, bootmae_shuffle_from_mask

    paddle.seed(0)
    model = create_model("bootmae_base")
    generator = bootmae_mask_generator(14)
    masks = np.stack([generator(rng=i) for i in range(2)])
    order, _ = bootmae_shuffle_from_mask(masks, model.mask_num, rng=np.random.default_rng(0))
    out = model(paddle.randn([2, 3, 224, 224]), idx_shuffle=order, **BOOTMAE.forward_kwargs(model, 300))
    assert out["pred_pixel"].shape == [2, 3, 224, 224]
    assert out["pred_feature"].shape == [2, 196, 768]
    np.testing.assert_array_equal(out["mask"].numpy().sum(1), [147, 147])
    assert np.isfinite(float(out["loss"])) and float(out["loss_feature"]) > 0
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    grad = model.decode_blocks_1[1].c_attn.kv.weight.grad
    assert grad is not None and np.isfinite(grad.numpy()).all()


# ------------------------------------------------------------------- logged grad norm
@pytest.mark.parametrize("accum,clip", [(1, None), (2, None), (2, 0.05)])
def test_logged_grad_norm_is_the_one_the_official_loop_logs(accum, clip):
    """The official loop (run_pretraining.train_one_epoch + utils.NativeScalerWithGradNormCount)
    logs, on the step that updates, the L2 norm over ``model.parameters()`` that have a gradient
    (the student only; the EMA teacher is a separate module), of the gradients accumulated from
    ``loss / update_freq``, after unscaling, before clipping (``clip_grad_norm_`` returns the norm
    it found). The stepper's ``grad_norm`` must be that number."""
    from paddle_cae.engine.stepper import Stepper
    from paddle_cae.runtime.amp import Precision

    paddle.seed(0)
    model, reference = tiny(), tiny()
    reference.set_state_dict(model.state_dict())
    reference.set_teacher_state_dict(model.teacher_state_dict())
    images = paddle.randn([4, 3, 32, 32])
    order = random_order(4, 16, seed=3)
    per = 4 // accum

    for k in range(accum):  # the official loop, written out
        out = reference(images[k * per:(k + 1) * per], idx_shuffle=order[k * per:(k + 1) * per])
        (out["loss"] / accum).backward()
    grads = [p.grad.numpy() for p in reference.parameters() if p.grad is not None]
    assert all(p.grad is None for p in reference.teacher.parameters())
    official = float(np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads)))

    optimizer = paddle.optimizer.SGD(learning_rate=0.0, parameters=model.parameters())
    stepper = Stepper(model, optimizer, Precision(None), accum_iter=accum, clip_grad=clip)
    for k in range(accum):
        out = model(images[k * per:(k + 1) * per], idx_shuffle=order[k * per:(k + 1) * per])
        info = stepper.backward(out["loss"], k)
    assert info["stepped"]
    np.testing.assert_allclose(info["grad_norm"], official, rtol=1e-5)
    if clip:
        assert official > clip  # the logged value is the norm before clipping


def test_predicted_pixels_undo_the_per_patch_and_channel_pixel_target():
    model = tiny()
    images = paddle.randn([2, 3, 32, 32]) * 2 + 0.5
    target = model.pixel_target(images)  # [B, C, H, W], each patch and channel normalised
    x = target.numpy().reshape(2, 3, 4, 8, 4, 8)
    np.testing.assert_allclose(x.mean(axis=(3, 5)), 0.0, atol=1e-5)
    np.testing.assert_allclose(model.predicted_pixels(images, target).numpy(), images.numpy(),
                               rtol=1e-5, atol=1e-5)


def test_bootmae_base_can_be_built_lazily_to_count_or_shard_it():
    with paddle.LazyGuard():
        model = create_model("bootmae_base")
    assert trainable_count(model) == 115_373_251


def test_fused_decoder_blocks_match_the_reference_blocks(monkeypatch):
    """Accelerated, the decoders run FusedDecodeBlock: the same loss and gradients as the
    reference DecodeBlock (float32 rounding apart)."""
    from paddle_cae.fast import accelerate
    from paddle_cae.fast.kernels import extension as fused_ops
    from paddle_cae.fast.layers import FusedDecodeBlock
    from paddle_cae.models.bootmae import DecodeBlock

    if not fused_ops.usable(paddle.zeros([1])):
        pytest.skip("fused CPU kernels unavailable here")
    paddle.seed(0)
    fused = accelerate(tiny(), environ={"PADDLE_CAE_FUSED_OPS": "1"})
    reference = tiny()
    assert type(fused.decode_blocks[0]) is FusedDecodeBlock
    assert type(reference.decode_blocks_1[0]) is DecodeBlock
    reference.set_state_dict(fused.state_dict())
    reference.set_teacher_state_dict(fused.teacher_state_dict())
    images, order = paddle.randn([2, 3, 32, 32]), random_order(2, 16)
    outs = [m(images, idx_shuffle=order) for m in (fused, reference)]
    for key in ("loss", "pred_pixel", "pred_feature"):
        np.testing.assert_allclose(outs[0][key].numpy(), outs[1][key].numpy(), rtol=1e-4, atol=1e-5)
    for out in outs:
        out["loss"].backward()
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        if p.grad is not None:
            np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-3, atol=1e-6, err_msg=name)
