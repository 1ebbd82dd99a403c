"""Datasets, transforms and the loader: layout errors, corrupt files, pipelines, determinism."""
import os

import numpy as np
import pytest
from PIL import Image

from paddle_cae.data.datasets import (DatasetLayoutError, ImageFolder, build_dataset,
                                      default_data_path)
from paddle_cae.data.loader import build_loader, collate_samples
from paddle_cae.data.sampler import GlobalBatchSampler
from paddle_cae.methods import get_method
from paddle_cae.data.transforms import (CenterCrop, MapPixels, Normalize, RandomResizedCrop,
                                        RandomResizedCropTF, Resize, ToTensor,
                                        build_eval_transform,
                                        sample_rng)

TINY = {"input_size": 32, "patch_size": 4, "num_mask_patches": 30, "min_mask_patches_per_block": 4,
        "second_input_size": 64}


def _pretrain_transform(method, args):
    return get_method(method).pretrain_transform(args)


def _floats(pipeline, img):
    """A pipeline's sample with its images as the float32 the model takes."""
    return pipeline.to_floats(pipeline(img))


def _write_images(folder, n, size=(20, 16), start=0):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        value = (start + i) * 10 % 256
        Image.new("RGB", size, (value, value, value)).save(os.path.join(folder, f"img{start + i}.png"))


def _position_image(size=256):
    """R encodes the column, G the row: any crop/flip is readable from the pixel values."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[..., 0] = ramp[None, :].round()
    rgb[..., 1] = ramp[:, None].round()
    rgb[..., 2] = 128
    return Image.fromarray(rgb)


# ----------------------------------------------------------------------------- datasets
def test_demo_dataset_has_ten_classes_and_the_fixed_split():
    train = build_dataset("train")
    val = build_dataset("val", default_data_path())
    assert train.class_names == [str(d) for d in range(10)]
    assert val.class_names == train.class_names
    assert (len(train), len(val)) == (1438, 359)
    sample = train[0]
    assert sample["images"].shape == (32, 32, 3) and sample["labels"] == 0 and sample["replaced"] == -1


def test_missing_split_folder_error_shows_the_expected_tree(tmp_path):
    _write_images(tmp_path / "training" / "cat", 2)
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset("train", str(tmp_path))
    message = str(err.value)
    assert "no 'train/' folder" in message and "training" in message
    assert "train/" in message and "<class_a>/<image>" in message


def test_images_without_class_folders_error_names_the_fix(tmp_path):
    _write_images(tmp_path / "train", 3)
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset("train", str(tmp_path))
    assert "sub-folder per class" in str(err.value) and "val/" in str(err.value)


def test_extensions_are_case_insensitive_and_other_files_ignored(tmp_path):
    root = tmp_path / "train" / "a"
    _write_images(root, 1)
    Image.new("RGB", (8, 8)).save(root / "UPPER.JPG", format="JPEG")
    (root / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path / "train")
    assert sorted(os.path.basename(p) for p, _ in ds.samples) == ["UPPER.JPG", "img0.png"]


def test_split_path_itself_is_accepted_for_train(tmp_path):
    _write_images(tmp_path / "train" / "a", 2)
    assert len(build_dataset("train", str(tmp_path / "train"))) == 2


def test_corrupt_jpeg_is_replaced_by_the_next_sample_and_counted(tmp_path, caplog):
    root = tmp_path / "train"
    _write_images(root / "a", 3)
    _write_images(root / "b", 3, start=3)
    good = root / "a" / "img1.png"
    (root / "a" / "img1.png").unlink()
    (root / "a" / "img1.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    ds = ImageFolder(root, transform=ToTensor())
    bad_index = [os.path.basename(p) for p, _ in ds.samples].index("img1.jpg")
    sample = ds[bad_index]
    assert sample["replaced"] == bad_index
    np.testing.assert_array_equal(sample["images"], ds[bad_index + 1]["images"])
    assert "img1.jpg" in caplog.text and caplog.text.count("img1.jpg") == 1
    ds[bad_index]  # known bad now: skipped without a second warning
    assert caplog.text.count("img1.jpg") == 1
    assert not good.exists()

    loader = build_loader(ds, batch_size=4, shuffle=False, seed=0)
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert loader.replaced_this_epoch == 1
        assert sum(int((b["replaced"].numpy() >= 0).sum()) for b in batches) == 1
    assert loader.replaced_total == 2


def test_replacement_is_counted_inside_worker_processes(tmp_path):
    root = tmp_path / "train"
    _write_images(root / "a", 4)
    (root / "a" / "img0.png").write_bytes(b"broken")
    ds = ImageFolder(root, transform=ToTensor())
    loader = build_loader(ds, batch_size=2, shuffle=False, num_workers=1, seed=0)
    list(loader)
    assert loader.replaced_this_epoch == 1
    assert 0 in ds.known_bad  # reported back to the main process for the next epoch's workers


# ---------------------------------------------------------------------------- transforms
def test_to_tensor_and_normalize_give_chw_float32():
    img = Image.new("RGB", (4, 2), (255, 0, 51))
    chw = ToTensor()(img)
    assert chw.shape == (3, 2, 4) and chw.dtype == np.float32
    np.testing.assert_allclose(chw[:, 0, 0], [1.0, 0.0, 0.2], atol=1e-6)
    out = Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(chw)
    np.testing.assert_allclose(out[:, 0, 0], [1.0, -1.0, -0.6], atol=1e-6)
    np.testing.assert_allclose(MapPixels(0.1)(chw)[:, 0, 0], [0.9, 0.1, 0.26], atol=1e-6)


def test_random_resized_crop_falls_back_to_a_centred_box():
    wide = Image.new("RGB", (1000, 10))
    with sample_rng(0):
        top, left, h, w = RandomResizedCrop.get_params(wide, (0.9, 1.0), (3 / 4, 4 / 3))
    assert (top, h, w) == (0, 10, 13) and left == (1000 - 13) // 2


def test_tf_style_crop_clamps_the_box_to_the_image():
    img = Image.new("RGB", (40, 30))
    with sample_rng(3):
        for _ in range(50):
            top, left, h, w = RandomResizedCropTF.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
            assert 0 < h <= 30 and 0 < w <= 40 and top + h <= 30 and left + w <= 40


def test_eval_transform_resizes_shorter_side_then_centre_crops():
    img = Image.new("RGB", (300, 200))
    assert Resize(256)(img).size == (384, 256)
    assert CenterCrop(224)(Resize(256)(img)).size == (224, 224)
    assert build_eval_transform(224)(img).shape == (3, 224, 224)
    assert build_eval_transform(32)(img).shape == (3, 32, 32)


@pytest.mark.parametrize("method, keys", [
    ("mae", {"images", "noise"}),
    ("bootmae", {"images", "bool_masked_pos", "order"}),
    ("cae", {"images", "tokenizer_images", "bool_masked_pos"}),
])
def test_pretrain_pipelines_output_shapes_and_ranges(method, keys):
    transform = _pretrain_transform(method, dict(TINY, max_mask_patches_per_block=15))
    with sample_rng(0):
        out = _floats(transform, _position_image(48))
    assert set(out) == keys
    assert out["images"].shape == (3, 32, 32) and out["images"].dtype == np.float32
    if method == "mae":  # ImageNet normalisation
        assert out["images"].min() >= (0 - 0.485) / 0.229 - 1e-4 and out["images"].max() <= (1 - 0.406) / 0.225 + 1e-4
    else:  # 0.5 / 0.5
        assert out["images"].min() >= -1 - 1e-6 and out["images"].max() <= 1 + 1e-6
    if "bool_masked_pos" in out:
        assert out["bool_masked_pos"].dtype == bool and out["bool_masked_pos"].shape == (64,) and out["bool_masked_pos"].sum() == 30
    if "noise" in out:  # MAE's per-sample masking noise, one value per patch in [0, 1)
        assert out["noise"].shape == (64,) and 0 <= out["noise"].min() and out["noise"].max() < 1
    if method == "cae":
        tok = out["tokenizer_images"]
        assert tok.shape == (3, 64, 64) and tok.min() >= 0.1 - 1e-6 and tok.max() <= 0.9 + 1e-6


def test_cae_second_view_defaults_to_half_the_input_size():
    args = dict(TINY, input_size=224, patch_size=16, num_mask_patches=98)
    args.pop("second_input_size")
    with sample_rng(0):
        out = _floats(_pretrain_transform("cae", args), _position_image(256))
    assert out["images"].shape == (3, 224, 224) and out["tokenizer_images"].shape == (3, 112, 112)


def test_cae_views_come_from_the_same_crop_box_and_flip():
    transform = _pretrain_transform("cae", dict(TINY, input_size=64, second_input_size=32,
                                                     patch_size=8, num_mask_patches=20))
    img = _position_image(256)
    flips = 0
    for seed in range(12):
        with sample_rng(seed):
            out = _floats(transform, img)
        view = out["images"] * 0.5 + 0.5            # undo 0.5/0.5 normalisation -> [0, 1]
        tok = (out["tokenizer_images"] - 0.1) / 0.8  # undo map_pixels
        # R (the source column) read along columns, G (the source row) along rows
        for profile in (lambda x: x[0].mean(axis=0), lambda x: x[1].mean(axis=1)):
            a, b = profile(view), profile(tok)            # 64 and 32 samples over the same box
            np.testing.assert_allclose([a[:2].mean(), a[-2:].mean()], [b[0], b[-1]], atol=0.02)
        flips += int(view[0, :, 0].mean() > view[0, :, -1].mean())  # x decreasing -> flipped
    assert 0 < flips < 12


def test_same_seed_and_epoch_give_identical_batches_for_any_worker_count():
    ds = build_dataset("train", None, _pretrain_transform("cae", TINY))
    batches = []
    for workers in (0, 2):
        loader = build_loader(ds, batch_size=16, shuffle=True, num_workers=workers, seed=5, epoch=3)
        batches.append({k: v.numpy() for k, v in next(iter(loader)).items()})
    for key in batches[0]:
        np.testing.assert_array_equal(batches[0][key], batches[1][key])


def test_epoch_and_seed_change_order_and_augmentation():
    ds = build_dataset("train", None, _pretrain_transform("bootmae", dict(TINY, max_mask_patches_per_block=15)))
    loader = build_loader(ds, batch_size=8, shuffle=True, seed=0, epoch=0)
    first = next(iter(loader))
    loader.set_epoch(1)
    second = next(iter(loader))
    loader.set_epoch(0)
    again = next(iter(loader))
    np.testing.assert_array_equal(first["images"].numpy(), again["images"].numpy())
    np.testing.assert_array_equal(first["bool_masked_pos"].numpy(), again["bool_masked_pos"].numpy())
    assert not np.array_equal(first["labels"].numpy(), second["labels"].numpy()) or \
        not np.array_equal(first["images"].numpy(), second["images"].numpy())
    other_seed = next(iter(build_loader(ds, batch_size=8, shuffle=True, seed=1, epoch=0)))
    assert not np.array_equal(first["images"].numpy(), other_seed["images"].numpy())


def test_sampler_splits_one_shuffled_order_across_ranks():
    per_rank = []
    for rank in range(2):
        sampler = GlobalBatchSampler(10, batch_size=2, world_size=2, rank=rank, shuffle=True, seed=7)
        sampler.set_epoch(4)
        per_rank.append([i for batch in sampler for i in batch])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(set(per_rank[0] + per_rank[1]))  # no overlap
    assert len(per_rank[0]) == len(per_rank[1]) == 4  # two global batches of 4 (2 dropped)
    single = GlobalBatchSampler(10, batch_size=4, world_size=1, rank=0, shuffle=True, seed=7)
    single.set_epoch(4)
    # one process at batch 4 sees the same global batches as two at batch 2
    assert [i for b in single for i in b] == [i for k in range(2) for r in range(2)
                                                for i in per_rank[r][2 * k:2 * k + 2]]


def test_collate_names_the_key_whose_shapes_differ():
    with pytest.raises(ValueError, match="'images'"):
        collate_samples([{"images": np.zeros((3, 4))}, {"images": np.zeros((3, 5))}])


# ------------------------------------------------------------------ fine-tune augmentation
def test_every_randaugment_op_keeps_size_and_mode():
    from paddle_cae.data.transforms import RandAugment

    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (24, 20, 3), dtype=np.uint8))
    ra = RandAugment.from_string("rand-m9-mstd0.5-inc1")
    assert (ra.num_ops, ra.magnitude, ra.magnitude_std, len(ra.ops)) == (2, 9.0, 0.5, 15)
    with sample_rng(0):
        for name, (apply, level_to_args) in ra.ops:
            out = apply(img, *level_to_args(9.0), fill=ra.fill, resample=ra.resample)
            assert out.size == img.size and out.mode == "RGB", name


@pytest.mark.parametrize("level", [0.0, 10.0])
def test_every_randaugment_op_runs_at_the_extreme_levels_on_the_installed_pillow(level):
    from paddle_cae.data.transforms import RandAugment

    img = Image.fromarray(np.random.RandomState(1).randint(0, 256, (24, 20, 3), dtype=np.uint8))
    ra = RandAugment.from_string("rand-m9-mstd0.5-inc1")
    for seed in range(2):  # both signs of the signed ops
        with sample_rng(seed):
            for name, (apply, level_to_args) in ra.ops:
                out = apply(img, *level_to_args(level), fill=ra.fill, resample=ra.resample)
                assert out.size == img.size and out.mode == "RGB", (name, level)


def test_posterize_keeps_the_old_pillow_lut_down_to_zero_bits():
    from paddle_cae.data.transforms import RandAugment

    rgb = np.random.RandomState(2).randint(0, 256, (16, 16, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    apply, level_to_args = dict(RandAugment().ops)["PosterizeIncreasing"]
    assert level_to_args(10.0) == (0,) and level_to_args(0.0) == (4,)
    for bits in range(0, 9):
        mask = ~(2 ** (8 - bits) - 1)  # the LUT of Pillow's posterize before it refused bits=0
        expected = rgb & np.uint8(mask & 0xFF)
        out = apply(img, bits)
        assert out.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(out), expected, err_msg=f"bits={bits}")
    assert not np.asarray(apply(img, 0)).any()  # magnitude 10: black


def test_randaugment_at_full_magnitude_runs_every_op():
    from paddle_cae.data.transforms import RandAugment

    img = _position_image(32)
    ra = RandAugment(num_ops=2, magnitude=10.0, magnitude_std=0.0, op_prob=1.0)
    for seed in range(40):  # 80 draws from 15 ops: every op comes up
        with sample_rng(seed):
            out = ra(img)
        assert out.size == img.size and out.mode == "RGB"


def test_a_failing_transform_names_the_image_instead_of_skipping_it(tmp_path):
    _write_images(str(tmp_path / "a"), 2)

    def broken(img):
        raise ValueError("bits must be between or equal to 1 and 8")

    ds = ImageFolder(str(tmp_path), transform=broken)
    with pytest.raises(RuntimeError, match=r"img0\.png.*ValueError: bits must be"):
        ds[0]
    assert not ds.known_bad  # the file itself is fine: not remembered as unreadable


def test_randaugment_is_reproducible_and_changes_images():
    from paddle_cae.data.transforms import RandAugment

    img = _position_image(32)
    ra = RandAugment(op_prob=1.0)
    with sample_rng(4):
        a = np.asarray(ra(img))
    with sample_rng(4):
        b = np.asarray(ra(img))
    np.testing.assert_array_equal(a, b)
    changed = 0
    for seed in range(5):
        with sample_rng(seed):
            changed += int(not np.array_equal(np.asarray(ra(img)), np.asarray(img)))
    assert changed >= 4


def test_random_erasing_fills_one_box_with_noise():
    from paddle_cae.data.transforms import RandomErasing

    chw = np.full((3, 32, 32), 5.0, np.float32)
    with sample_rng(0):
        out = RandomErasing(p=1.0)(chw)
    erased = (out != 5.0).all(axis=0)
    rows, cols = np.nonzero(erased)
    assert 0.02 * 1024 * 0.5 <= erased.sum() <= 1024 / 3 + 40
    assert erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a rectangle
    assert (chw == 5.0).all()  # input untouched
    with sample_rng(0):
        assert np.array_equal(RandomErasing(p=0.0)(chw), chw)


def test_finetune_transform_output_shape():
    from paddle_cae.data.transforms import build_finetune_transform

    with sample_rng(0):
        out = build_finetune_transform(32)(_position_image(48))
    assert out.shape == (3, 32, 32) and out.dtype == np.float32


def test_mixup_targets_are_smoothed_and_sum_to_one():
    import paddle

    from paddle_cae.data.mixup import Mixup, one_hot_smoothed

    hot = one_hot_smoothed(paddle.to_tensor([2]), 5, smoothing=0.1).numpy()
    np.testing.assert_allclose(hot, [[0.02, 0.02, 0.92, 0.02, 0.02]], atol=1e-6)
    x = paddle.to_tensor(np.stack([np.full((3, 8, 8), i, np.float32) for i in range(4)]))
    y = paddle.to_tensor([0, 1, 2, 3])
    for seed in range(6):
        mix = Mixup(num_classes=4, rng=np.random.RandomState(seed))
        images, targets = mix(x, y)
        t = targets.numpy()
        np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-5)
        lam = (t[0, 0] - 0.025) / 0.9  # weight of the sample's own label
        # image mass matches the label weights: own value * lam + reversed value * (1 - lam)
        np.testing.assert_allclose(images.numpy()[0].mean(), 3 * (1 - lam), atol=1e-4)


def test_mixup_disabled_gives_plain_smoothed_targets():
    import paddle

    from paddle_cae.data.mixup import Mixup

    x = paddle.rand([2, 3, 4, 4])
    images, targets = Mixup(prob=0.0, num_classes=3, label_smoothing=0.0)(x, paddle.to_tensor([1, 2]))
    np.testing.assert_array_equal(images.numpy(), x.numpy())
    np.testing.assert_array_equal(targets.numpy(), [[0, 1, 0], [0, 0, 1]])


# --------------------------------------------------------- small-image path (input <= 32)
def test_random_crop_pads_with_black_and_keeps_a_window_of_the_padded_image():
    from paddle_cae.data.transforms import RandomCrop

    img = _position_image(32)
    src = np.asarray(img).astype(np.int32)
    padded = np.zeros((40, 40, 3), np.int32)
    padded[4:36, 4:36] = src
    offsets = set()
    for seed in range(60):
        with sample_rng(seed):
            out = np.asarray(RandomCrop(32, padding=4)(img)).astype(np.int32)
        assert out.shape == (32, 32, 3)
        match = [(t, l) for t in range(9) for l in range(9) if np.array_equal(padded[t:t + 32, l:l + 32], out)]
        assert len(match) == 1
        offsets.add(match[0])
    assert len(offsets) > 30 and min(offsets) >= (0, 0) and max(offsets) <= (8, 8)
    assert any(t in (0, 8) or l in (0, 8) for t, l in offsets)  # the full offset range is used


@pytest.mark.parametrize("method,size,small", [("cae", 32, True), ("bootmae", 32, True), ("bootmae", 16, True),
                                               ("mae", 32, False), (None, 32, False), ("cae", 33, False),
                                               ("bootmae", 224, False)])
def test_finetune_and_eval_transforms_take_the_official_small_image_branch(method, size, small):
    from paddle_cae.data.transforms import (RandAugment, RandomCrop, RandomErasing, RandomHorizontalFlip,
                                            build_finetune_transform, small_image_path)

    method = get_method(method) if method else None
    assert small_image_path(method, size) == small
    train = build_finetune_transform(size, method=method)
    kinds = [type(t) for t in train.transforms]
    assert kinds[1:] == [RandomHorizontalFlip, RandAugment, ToTensor, Normalize, RandomErasing]  # rest unchanged
    assert (kinds[0] is RandomCrop) == small and (kinds[0] is RandomResizedCrop) == (not small)
    if small:
        assert train.transforms[0].padding == 4 and train.transforms[0].size == (size, size)
    evaluation = build_eval_transform(size, method=method)
    assert [type(t) for t in evaluation.transforms] == ([ToTensor, Normalize] if small
                                                        else [Resize, CenterCrop, ToTensor, Normalize])


def test_small_image_eval_keeps_the_pixels_and_training_crops_at_full_scale():
    from paddle_cae.data.transforms import build_finetune_transform

    img = _position_image(32)
    out = build_eval_transform(32, mean=(0, 0, 0), std=(1, 1, 1), method=get_method("bootmae"))(img)
    np.testing.assert_allclose(out, np.asarray(img).transpose(2, 0, 1) / 255.0, atol=1e-6)
    resized = build_eval_transform(32, mean=(0, 0, 0), std=(1, 1, 1), method=get_method("mae"))(img)
    assert not np.allclose(resized, out, atol=1e-3)  # MAE resizes to 36 and centre-crops
    train = build_finetune_transform(32, mean=(0, 0, 0), std=(1, 1, 1), auto_augment=None, reprob=0,
                                     method=get_method("cae"))
    with sample_rng(3):
        chw = train(img)
    # a shifted window of the original pixels (no rescaling): every value is one of the image's or 0
    values = set(np.unique(np.round(chw[0] * 255)).astype(int))
    assert values <= set(np.unique(np.asarray(img)[..., 0]).astype(int)) | {0}


@pytest.mark.parametrize("method,size,pct", [("mae", 224, 0.875), ("mae", 256, 1.0), ("cae", 256, 0.875),
                                             ("bootmae", 383, 0.875), ("bootmae", 384, 1.0), (None, 256, 1.0)])
def test_default_eval_crop_fraction_follows_each_official_build_transform(method, size, pct):
    from paddle_cae.data.transforms import default_crop_pct

    method = get_method(method) if method else None
    assert default_crop_pct(size, method) == pytest.approx(pct)
    resize = build_eval_transform(size, method=method).transforms[0]
    assert resize.size == int(size / pct)
