"""Segmentation parts written in this package (no PaddleSeg needed): encoder feature maps, the
multi-scale neck, table resizing to the crop, layer-decay groups, the poly schedule, mIoU,
sliding windows, the data checks and transforms, the demo set."""
import os

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from PIL import Image

from paddle_cae.cli.segment import load_encoder_weights, main as segment_main
from paddle_cae.downstream.inference import colour_mask, save_colour_mask, slide_logits, window_starts
from paddle_cae.downstream.metrics import SegmentationMeter
from paddle_cae.downstream.optim import poly_lr, segmentation_groups
from paddle_cae.downstream.seg_args import build_encoder, encoder_kwargs
from paddle_cae.downstream.seg_data import (DEMO_NUM_CLASSES, IGNORE_INDEX, DemoSegmentation,
                                            EvalTransform, SegmentationFolder, TrainTransform,
                                            reduce_zero_label, rescale_size, write_demo_dataset)
from paddle_cae.downstream.segmentor import (MultiScaleNeck, Segmentor, encoder_feature_maps,
                                             prune_classifier)
from paddle_cae.loading.pretrained import PretrainedLoadError, resample_rel_pos_table
from paddle_cae.models import create_model
from paddle_cae.models.pos_embed import resize_pos_embed
from paddle_cae.runtime.checkpoint import save_checkpoint

SMALL = {"patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2}


def small_config(model="cae_base_patch16_224", crop=32, **changes):
    config = {"model": model, "model_args": dict(SMALL), "crop_size": crop, "drop_path": 0.0,
              "rel_pos_bias": True, "layer_scale_init_value": None, "num_classes": 5,
              "out_indices": [0, 1, 2, 3], "pos_embed_trainable": False}
    config.update(changes)
    return config


def small_segmentor(config):
    encoder = prune_classifier(build_encoder(config))
    head = nn.Conv2D(SMALL["embed_dim"], config["num_classes"], 1)

    class Head(nn.Layer):  # a one-conv decode head: the layer-decay rule must not care which
        def __init__(self):
            super().__init__()
            self.conv = head

        def forward(self, feats):  # every level reaches the output
            return [self.conv(feats[0]) + sum(f.mean() for f in feats[1:])]

    return Segmentor(encoder, MultiScaleNeck(SMALL["embed_dim"], SMALL["patch_size"]), Head(),
                     config["out_indices"])


# ------------------------------------------------------------------------ network shapes
@pytest.mark.parametrize("patch,sizes", [(16, [32, 16, 8, 4]), (8, [16, 8, 4, 2]), (4, [8, 4, 2, 1])])
def test_neck_gives_strides_4_8_16_32(patch, sizes):
    crop = 128 if patch == 16 else (64 if patch == 8 else 32)
    grid = crop // patch
    neck = MultiScaleNeck(8, patch_size=patch)
    outs = neck([paddle.randn([2, 8, grid, grid]) for _ in range(4)])
    assert [list(o.shape) for o in outs] == [[2, 8, s, s] for s in sizes]
    assert [crop // o.shape[-1] for o in outs] == [4, 8, 16, 32]


def test_neck_patch16_is_deconv_bn_gelu_deconv_then_deconv_identity_maxpool():
    neck = MultiScaleNeck(8, patch_size=16)
    kinds = [type(layer).__name__ for layer in neck.fpn1]
    assert kinds == ["Conv2DTranspose", "NeckBatchNorm2D", "GELU", "Conv2DTranspose"]
    assert isinstance(neck.fpn1[1], nn.BatchNorm2D)  # SyncBatchNorm conversion still applies
    assert [type(layer).__name__ for layer in neck.fpn2] == ["Conv2DTranspose"]
    assert isinstance(neck.fpn3, nn.Identity) and isinstance(neck.fpn4, nn.MaxPool2D)


def test_neck_batchnorm_updates_running_variance_with_the_unbiased_variance():
    from paddle_cae.downstream.segmentor import NeckBatchNorm2D

    bn = NeckBatchNorm2D(3)  # Paddle momentum 0.9 = PyTorch's 0.1
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(2, 3, 2, 2)).astype("float32")
    bn.train()
    out = bn(paddle.to_tensor(x)).numpy()
    mean, biased = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    unbiased = x.var(axis=(0, 2, 3), ddof=1)  # n = 8 values per channel
    np.testing.assert_allclose(out, (x - mean[:, None, None]) / np.sqrt(biased[:, None, None] + 1e-5),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn._mean.numpy(), 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn._variance.numpy(), 0.9 + 0.1 * unbiased, rtol=1e-5)
    assert int(bn.num_batches_tracked) == 1 and "num_batches_tracked" not in bn.state_dict()
    assert isinstance(nn.SyncBatchNorm.convert_sync_batchnorm(bn), nn.SyncBatchNorm)


def test_neck_rejects_a_patch_size_off_the_stride_ladder():
    with pytest.raises(ValueError, match="patch size"):
        MultiScaleNeck(8, patch_size=12)


def test_feature_maps_are_the_classifiers_patch_tokens_after_each_block():
    paddle.seed(0)
    encoder = build_encoder(small_config(), for_training=False)
    encoder.eval()
    x = paddle.randn([2, 3, 32, 32])
    maps = encoder_feature_maps(encoder, x, [0, 2, 3, 1])
    for block, got in zip([0, 2, 3, 1], maps):
        tokens = encoder.forward_tokens(x, depth=block + 1)[:, 1:]  # [B, 64, D]
        want = tokens.numpy().transpose(0, 2, 1).reshape(2, SMALL["embed_dim"], 8, 8)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_feature_maps_refuse_an_input_other_than_the_crop():
    encoder = build_encoder(small_config())
    with pytest.raises(ValueError, match="32x32 crops"):
        encoder_feature_maps(encoder, paddle.randn([1, 3, 48, 48]), [0, 1, 2, 3])


def test_segmentor_logits_have_the_input_size_and_unused_parts_are_gone():
    model = small_segmentor(small_config())
    out = model(paddle.randn([2, 3, 32, 32]))
    assert list(out[0].shape) == [2, 5, 32, 32]
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith(("backbone.fc_norm", "backbone.norm.", "backbone.head")) for n in names)
    loss = out[0].mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if not p.stop_gradient and p.grad is None]
    assert missing == []  # every trainable parameter gets a gradient (data-parallel needs it)


def test_encoder_kwargs_refuse_model_args_that_contradict_the_crop():
    with pytest.raises(ValueError, match="img_size"):
        encoder_kwargs(small_config(model_args=dict(SMALL, img_size=224)))


# ---------------------------------------------------------------- tables resized to the crop
def _export(tmp_path, encoder):
    path = str(tmp_path / "encoder.pd")
    save_checkpoint({"kind": "encoder", "model_name": "cae_base_patch16_224",
                     "model": {k: v.numpy() for k, v in encoder.state_dict().items()}}, path)
    return path


def test_rel_pos_and_position_tables_are_resized_to_the_crop(tmp_path):
    paddle.seed(1)
    source = create_model("cae_base_patch16_224", img_size=16, num_classes=0, **SMALL)  # grid 4
    for blk in source.blocks:
        table = blk.attn.relative_position_bias_table
        table.set_value(paddle.randn(table.shape))
    path = _export(tmp_path, source)
    encoder = build_encoder(small_config(crop=32))  # grid 8
    load_encoder_weights(encoder, path)
    for src_blk, blk in zip(source.blocks, encoder.blocks):
        got = blk.attn.relative_position_bias_table.numpy()
        assert got.shape == ((2 * 8 - 1) ** 2 + 3, SMALL["num_heads"])
        want = resample_rel_pos_table(src_blk.attn.relative_position_bias_table.numpy(), (8, 8))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        # the three cls entries are copied, and the centre (zero offset) keeps its value
        np.testing.assert_array_equal(got[-3:], src_blk.attn.relative_position_bias_table.numpy()[-3:])
    # the checkpoint's sin-cos table is resized (the official loaders do), not rebuilt for 8x8
    want_pos = resize_pos_embed(source.pos_embed.numpy(), (8, 8))
    np.testing.assert_allclose(encoder.pos_embed.numpy(), want_pos, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(encoder.blocks[0].attn.qkv.weight.numpy(),
                               source.blocks[0].attn.qkv.weight.numpy())


def test_mae_encoder_gets_new_layer_scale_and_rel_pos_but_needs_every_other_weight(tmp_path):
    source = create_model("vit_base_patch16", img_size=16, num_classes=0, **SMALL)
    path = _export(tmp_path, source)
    encoder = build_encoder(small_config("vit_base_patch16", layer_scale_init_value=1.0))
    report = load_encoder_weights(encoder, path)
    assert {k.rsplit(".", 1)[-1] for k in report.initialised} == {"gamma_1", "gamma_2",
                                                                  "relative_position_bias_table"}
    np.testing.assert_array_equal(encoder.blocks[0].gamma_1.numpy(), np.ones(SMALL["embed_dim"]))
    state = {k: v.numpy() for k, v in source.state_dict().items() if not k.startswith("blocks.1.mlp")}
    save_checkpoint({"model": state}, str(tmp_path / "partial.pd"))
    with pytest.raises(PretrainedLoadError, match="blocks.1.mlp"):
        load_encoder_weights(build_encoder(small_config("vit_base_patch16")), str(tmp_path / "partial.pd"))


# --------------------------------------------------------------------------- optimisation
def test_layer_decay_groups_follow_the_official_segmentation_rule():
    model = small_segmentor(small_config())
    groups = segmentation_groups(model, 0.05, 0.65)
    by_name = {n: g for g in groups for n in g["param_names"]}
    depth = SMALL["depth"]
    assert by_name["backbone.patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.65 ** (depth + 1))
    for i in range(depth):
        assert by_name[f"backbone.blocks.{i}.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.65 ** (depth - i))
    assert not any(n.startswith("neck.") for n in by_name)  # patch 4: identity and max-pools
    name = "decode_head.conv.weight"
    assert by_name[name]["lr_scale"] == 1.0 and by_name[name]["weight_decay"] == 0.05
    # 1-D tensors and biases skip weight decay; the cls token does not (the official names never match)
    assert by_name["backbone.blocks.0.norm1.weight"]["weight_decay"] == 0.0
    assert by_name["decode_head.conv.bias"]["weight_decay"] == 0.0
    assert by_name["backbone.cls_token"]["weight_decay"] == 0.05
    assert by_name["backbone.cls_token"]["lr_scale"] == pytest.approx(0.65 ** (depth + 1))
    assert "backbone.pos_embed" not in by_name  # the fixed table is not trained


def test_trainable_position_table_joins_layer_0():
    model = small_segmentor(small_config(pos_embed_trainable=True))
    model.pos_embed_trainable = True
    model.backbone.pos_embed.stop_gradient = False
    by_name = {n: g for g in segmentation_groups(model, 0.05, 0.65) for n in g["param_names"]}
    assert by_name["backbone.pos_embed"]["lr_scale"] == pytest.approx(0.65 ** (SMALL["depth"] + 1))


def test_poly_schedule_with_linear_warmup():
    assert poly_lr(0, 1e-4, 100, warmup_iters=10, warmup_ratio=1e-6) == pytest.approx(1e-10)
    # iteration 5: poly (1 - 5/100) then warm-up factor 1 - (1 - 5/10)(1 - 1e-6)
    assert poly_lr(5, 1e-4, 100, warmup_iters=10) == pytest.approx(1e-4 * 0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert poly_lr(50, 1e-4, 100, warmup_iters=10) == pytest.approx(0.5e-4)
    assert poly_lr(75, 2e-4, 100, power=2.0, min_lr=1e-6) == pytest.approx((2e-4 - 1e-6) * 0.0625 + 1e-6)


# ------------------------------------------------------------------------------- metrics
def test_miou_macc_aacc_against_a_hand_computation():
    meter = SegmentationMeter(3)
    label = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    meter.update(pred, label)
    # class 0: label px 2, pred px (valid) 3, hit 1 -> IoU 1/4, Acc 1/2
    # class 1: label 3, pred 3, hit 2 -> IoU 2/4, Acc 2/3
    # class 2: label 2, pred 1, hit 1 -> IoU 1/2, Acc 1/2   (the 255 pixel and its prediction ignored)
    s = meter.summary()
    assert s["IoU"] == pytest.approx([25.0, 50.0, 50.0])
    assert s["mIoU"] == pytest.approx(125.0 / 3)
    assert s["mAcc"] == pytest.approx((50.0 + 200 / 3 + 50.0) / 3)
    assert s["aAcc"] == pytest.approx(4 / 7 * 100)


def test_miou_leaves_out_classes_that_never_occur_and_sums_over_images():
    meter = SegmentationMeter(4)
    meter.update(np.array([0, 0, 1]), np.array([0, 1, 1]))
    meter.update(np.array([1, 3]), np.array([1, 1]))
    s = meter.summary()
    # class 2 absent everywhere -> left out; class 3 predicted but never labelled -> IoU 0
    assert np.isnan(s["IoU"][2])
    assert s["IoU"][3] == 0.0
    assert s["IoU"][0] == pytest.approx(50.0) and s["IoU"][1] == pytest.approx(200 / 4)
    assert s["mIoU"] == pytest.approx((50.0 + 50.0 + 0.0) / 3)


# ------------------------------------------------------------------------------ inference
def test_window_starts_follow_the_official_grid():
    assert window_starts(1000, 512, 341) == [0, 341, 488]
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(300, 512, 341) == [0]


class _PointwiseHead(nn.Layer):
    """A 1x1 convolution: any window gives the same logits at a pixel as the whole image."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(3, 4, 1)
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape[2:]))
        return [self.conv(x)]


def test_slide_inference_averages_windows_and_pads_short_sides():
    paddle.seed(0)
    model = _PointwiseHead()
    image = np.random.RandomState(0).randn(3, 40, 70).astype("float32")
    got = slide_logits(model, image, 4, crop=32, stride=20)
    want = model.conv(paddle.to_tensor(image[None]))[0].numpy()
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    assert set(model.seen) == {(32, 32)}
    assert len(model.seen) == len(window_starts(40, 32, 20)) * len(window_starts(70, 32, 20))
    small = np.random.RandomState(1).randn(3, 20, 25).astype("float32")
    np.testing.assert_allclose(slide_logits(model, small, 4, crop=32, stride=20).numpy(),
                               model.conv(paddle.to_tensor(small[None]))[0].numpy(), rtol=1e-5, atol=1e-5)


def test_colour_mask_png_has_one_colour_per_class(tmp_path):
    mask = np.array([[0, 1], [2, 255]])
    rgb = colour_mask(mask, 3)
    assert len({tuple(c) for c in rgb.reshape(-1, 3)}) == 4 and tuple(rgb[1, 1]) == (0, 0, 0)
    path = save_colour_mask(mask, 3, str(tmp_path / "m.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(path)), rgb)


# ---------------------------------------------------------------------------------- data
def test_reduce_zero_label_ignores_0_and_255():
    label = np.array([0, 1, 150, 255], np.uint8)
    assert reduce_zero_label(label).tolist() == [IGNORE_INDEX, 0, 149, IGNORE_INDEX]


def test_rescale_size_fits_long_and_short_edges():
    assert rescale_size(683, 512, (2048, 512)) == (683, 512)
    assert rescale_size(400, 300, (2048, 512)) == (683, 512)
    assert rescale_size(3000, 500, (2048, 512)) == (2048, 341)


def _ade(root, pairs):
    for split, items in pairs.items():
        folder = {"train": "training", "val": "validation"}[split]
        os.makedirs(root / "images" / folder, exist_ok=True)
        os.makedirs(root / "annotations" / folder, exist_ok=True)
        for name, image, label in items:
            if image is not None:
                Image.fromarray(image).save(root / "images" / folder / f"{name}.jpg")
            if label is not None:
                Image.fromarray(label).save(root / "annotations" / folder / f"{name}.png")
    return root


def _pair(h=20, w=30, value=2):
    return np.full((h, w, 3), 120, np.uint8), np.full((h, w), value, np.uint8)


@pytest.mark.parametrize("case,message", [
    ("no_label", "no label"),
    ("no_image", "label without an image"),
    ("size", "label is 30x10, its image 30x20"),
    ("value", "label value 9 is above --num_classes 5"),
    ("empty", "empty split"),
])
def test_bad_segmentation_folders_fail_with_one_line_naming_the_file(tmp_path, case, message):
    img, lbl = _pair()
    items = [("a", img, lbl)]
    if case == "no_label":
        items.append(("b", img, None))
    elif case == "no_image":
        items.append(("b", None, lbl))
    elif case == "size":
        items.append(("b", img, lbl[:10]))
    elif case == "value":
        items.append(("b", img, np.full_like(lbl, 9)))
    elif case == "empty":
        items = []
    root = _ade(tmp_path / "data", {"val": items})
    os.makedirs(root / "images" / "validation", exist_ok=True)
    os.makedirs(root / "annotations" / "validation", exist_ok=True)
    with pytest.raises(ValueError, match=message) as info:
        SegmentationFolder(root, "val", 5)
    assert "\n" not in str(info.value)
    if case != "empty":
        assert "b." in str(info.value)


def test_label_values_0_and_255_are_accepted(tmp_path):
    img, lbl = _pair()
    lbl[0, 0], lbl[0, 1] = 0, 255
    root = _ade(tmp_path / "d", {"val": [("a", img, lbl)]})
    assert len(SegmentationFolder(root, "val", 2)) == 1


def test_segment_command_with_a_bad_label_writes_nothing(tmp_path, capsys):
    img, lbl = _pair()
    root = _ade(tmp_path / "d", {"train": [("a", img, lbl)], "val": [("v", img, np.full_like(lbl, 7))]})
    out = tmp_path / "out"
    code = segment_main(["--data_path", str(root), "--num_classes", "5", "--output_dir", str(out),
                         "--model_args", '{"patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2}',
                         "--crop_size", "32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "v.png" in err[0] and "above --num_classes 5" in err[0]
    assert not out.exists()


def test_train_transform_gives_crop_sized_normalised_arrays_and_valid_targets():
    from paddle_cae.data.transforms import sample_rng

    image, label = DemoSegmentation("val", count=1).raw(0)
    tf = TrainTransform(48, (128, 64), (0.5, 2.0), 0.75, (0.5,) * 3, (0.5,) * 3)
    with sample_rng(3):
        a = tf(image, label)
    with sample_rng(3):
        b = tf(image, label)
    assert a["images"].shape == (3, 48, 48) and a["labels"].shape == (48, 48)
    np.testing.assert_array_equal(a["images"], b["images"])  # the per-sample generator decides
    values = set(np.unique(a["labels"]).tolist())
    assert values <= set(range(DEMO_NUM_CLASSES)) | {IGNORE_INDEX}
    assert -1.0 - 1e-6 <= a["images"].min() and a["images"].max() <= 1.0 + 1e-6
    ev = EvalTransform((128, 64), (0.5,) * 3, (0.5,) * 3)(image, label)
    assert ev["images"].shape == (3, 64, 64) and ev["labels"].shape == label.shape


def test_demo_set_is_fixed_and_labels_mark_canvas_digits_and_soft_edges(tmp_path):
    a, b = DemoSegmentation("train", count=5), DemoSegmentation("train", count=5)
    for (ia, la), (ib, lb) in zip(a.samples, b.samples):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
    labels = np.concatenate([lbl.ravel() for _, lbl in a.samples])
    assert labels.max() <= DEMO_NUM_CLASSES and {0, 1} <= set(labels.tolist())
    assert (labels >= 2).any()
    root = write_demo_dataset(tmp_path / "demo", counts={"train": 3, "val": 2})
    folder = SegmentationFolder(root, "val", DEMO_NUM_CLASSES)
    assert len(folder) == 2
    np.testing.assert_array_equal(folder.raw(0)[1], DemoSegmentation("val", count=2).raw(0)[1])


@pytest.mark.parametrize("name", sorted(p.name for p in
                                        (__import__("pathlib").Path(__file__).resolve().parents[1]
                                         / "configs" / "segmentation").glob("*.yaml")))
def test_segmentation_recipes_parse_and_keep_the_official_schedule(name):
    from paddle_cae.downstream.seg_args import parse_segment_args
    from paddle_cae.runtime.config import default_config_dir

    args = parse_segment_args(["--config", os.path.join(default_config_dir(), "segmentation", name)])
    assert args.layer_decay == 0.65 and args.weight_decay == 0.05 and args.power == 1.0
    if not name.startswith("demo_"):
        assert (args.crop_size, args.iters, args.warmup_iters, args.num_classes) == (512, 160000, 1500, 150)
        assert args.out_indices == [3, 5, 7, 11] and args.stride == 341 and args.channels == 768
