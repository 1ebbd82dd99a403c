"""The loader-side fast path (paddle_cae.data.fastpath): same draws and pixels as the reference
pipelines, uint8 hand-over converted in the training step, optional reduced JPEG decoding."""
import math
import random

import numpy as np
import paddle
import pytest
from PIL import Image

from paddle_cae.data.datasets import ImageFolder
from paddle_cae.data.fastpath import (ImageSource, decode_ratio, draft_scale, fast_twin,
                                      to_model_floats)
from paddle_cae.data.loader import SeededSamples, collate_samples
from paddle_cae.data.masking import BlockMaskGenerator
from paddle_cae.data.transforms import (BootMAEPretrainTransform, CAEPretrainTransform,
                                        MAEPretrainTransform, sample_rng)
from paddle_cae.engine.pretrain import model_batch


def _photo(width, height, seed=0):
    """A smooth, photo-like RGB image (JPEG compresses it like a photograph)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = [np.sin(xx / (17 + 9 * c) + c) * np.cos(yy / (23 + 5 * c)) for c in range(3)]
    img = np.stack(base, -1) * 90 + 128 + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _folder(tmp_path, sizes, fmt="JPEG"):
    for i, (w, h) in enumerate(sizes):
        d = tmp_path / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        _photo(w, h, seed=i).save(d / f"im{i}.{fmt.lower()}", quality=90)
    return tmp_path / "train"


def _transforms(size=32, grid=4):
    blocks = BlockMaskGenerator((grid, grid), 6, max_num_patches=None, min_num_patches=2)
    return {
        "mae": MAEPretrainTransform(size, num_patches=grid * grid),
        "bootmae": BootMAEPretrainTransform(BlockMaskGenerator((grid, grid), 8, max_num_patches=4,
                                                               min_num_patches=2), input_size=size, mask_num=6),
        "cae": CAEPretrainTransform(blocks, size, size // 2),
    }


def _to_paddle(batch):
    return {k: paddle.to_tensor(v) for k, v in batch.items()}


# ----------------------------------------------------------------- same samples as the reference
@pytest.mark.parametrize("method", ["mae", "bootmae", "cae"])
def test_uint8_hand_over_gives_the_reference_float_tensors_and_masks(tmp_path, method):
    root = _folder(tmp_path, [(61, 47), (40, 64), (90, 70), (33, 33)])
    transform = _transforms()[method]
    fast = SeededSamples(ImageFolder(root, transform), seed=11, epoch=2)
    ref = SeededSamples(ImageFolder(root, transform, handover="float32"), seed=11, epoch=2)
    a = collate_samples([fast[i] for i in range(4)])
    b = collate_samples([ref[i] for i in range(4)])
    assert a["images"].dtype == np.uint8 and b["images"].dtype == np.float32
    assert a["images"].nbytes * 4 == b["images"].nbytes
    converted = model_batch(_to_paddle(a))
    expected = model_batch(_to_paddle(b))
    assert sorted(converted) == sorted(expected)
    for key, value in expected.items():
        if isinstance(value, paddle.Tensor):
            assert converted[key].dtype == value.dtype, key
            np.testing.assert_allclose(converted[key].numpy(), value.numpy(), rtol=0, atol=1e-6,
                                       err_msg=key)
    if "bool_masked_pos" in b:  # the masks are the reference's, draw for draw
        np.testing.assert_array_equal(a["bool_masked_pos"], b["bool_masked_pos"])


def test_numpy_conversion_matches_the_paddle_one():
    transform = _transforms()["cae"]
    twin = fast_twin(transform)
    batch = {"images": np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8), dtype=np.uint8),
             "tokenizer_images": np.random.default_rng(1).integers(0, 256, (2, 3, 4, 4), dtype=np.uint8)}
    for key, spec in twin.specs.items():
        batch[key] = np.stack([spec, spec])
    from_numpy = to_model_floats(batch)
    from_paddle = to_model_floats(_to_paddle(batch))
    assert sorted(from_numpy) == sorted(from_paddle) == ["images", "tokenizer_images"]
    for key in from_numpy:
        np.testing.assert_array_equal(from_numpy[key], from_paddle[key].numpy())
    # and both are the reference's ToTensor + Normalize / map_pixels
    chw = batch["images"][0].astype(np.float32) / 255.0
    normalize = transform.patch_transform.transforms[1]
    np.testing.assert_array_equal(from_numpy["images"][0], normalize(chw))


def test_an_unreadable_jpeg_is_replaced_with_the_draws_the_reference_gives_it(tmp_path):
    root = _folder(tmp_path, [(60, 50), (70, 44), (52, 66)])
    bad = sorted(root.glob("*/*.jpeg"))[0]
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) * 2 // 3])  # header intact, scan data cut: fails when decoding
    transform = _transforms()["mae"]
    fast = ImageFolder(root, transform)
    ref = ImageFolder(root, transform, handover="float32")
    index = [p for p, _ in fast.samples].index(str(bad))
    with sample_rng(5):
        a = fast[index]
    with sample_rng(5):
        b = ref[index]
    assert a["replaced"] == b["replaced"] == index and index in fast.known_bad
    floats = to_model_floats({k: v[None] for k, v in a.items()})["images"][0]
    np.testing.assert_array_equal(floats, b["images"])
    np.testing.assert_array_equal(a["noise"], b["noise"])


def test_float32_hand_over_and_unknown_transforms_use_the_reference_path(tmp_path):
    root = _folder(tmp_path, [(40, 40)])
    assert ImageFolder(root, _transforms()["mae"]).fast_pipeline() is not None
    assert ImageFolder(root, _transforms()["mae"], handover="float32").fast_pipeline() is None
    assert ImageFolder(root, lambda img: np.asarray(img)).fast_pipeline() is None
    with pytest.raises(ValueError, match="handover must be one of"):
        ImageFolder(root, _transforms()["mae"], handover="fp16")
    with pytest.raises(ValueError, match="fast_decode must be"):
        ImageFolder(root, _transforms()["mae"], fast_decode=2.0)


# ------------------------------------------------------------ draws match the official definition
def _torchvision_get_params(width, height, rng, scale, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop.get_params as torchvision defines it, written out independently."""
    area = height * width
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _RecordingSource(ImageSource):
    """An in-memory 'file' that records the crop the pipeline decodes for."""

    def __init__(self, img):
        self.img, self.size, self.flipped, self.calls = img, img.size, False, []

    def decode(self, crop_w, crop_h, out_w, out_h, ratio=0.0, apply_flip=True):
        self.calls.append((crop_w, crop_h))
        img = self.img.transpose(Image.FLIP_LEFT_RIGHT) if self.flipped and apply_flip else self.img
        return img, 1.0


def _ks_statistic(a, b):
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, "right") / a.size - np.searchsorted(b, grid, "right") / b.size).max()


@pytest.mark.parametrize("method,scale", [("mae", (0.2, 1.0)), ("cae", (0.08, 1.0))])
def test_crop_scale_aspect_and_flip_rate_match_torchvision_over_many_draws(method, scale):
    width, height, draws = 120, 80, 3000
    ramp = np.tile(np.linspace(0, 255, width, dtype=np.float32).astype(np.uint8)[None, :, None], (height, 1, 3))
    image = Image.fromarray(ramp)  # brightness rises to the right: a flip shows
    transform = MAEPretrainTransform(16) if method == "mae" else \
        CAEPretrainTransform(BlockMaskGenerator((2, 2), 1, max_num_patches=None, min_num_patches=1), 16, 8,
                             scale=scale)
    twin = fast_twin(transform)
    fast_area, fast_logr, flips = [], [], 0
    for seed in range(draws):
        source = _RecordingSource(image)
        with sample_rng(seed):
            images = twin(source)["images"]
        (w, h), = source.calls
        fast_area.append(w * h / (width * height))
        fast_logr.append(math.log(w / h))
        flips += int(images[0, :, 0].mean() > images[0, :, -1].mean())
    rng = random.Random(12345)
    ref = [_torchvision_get_params(width, height, rng, scale) for _ in range(draws)]
    ref_area = [h * w / (width * height) for _, _, h, w in ref]
    ref_logr = [math.log(w / h) for _, _, h, w in ref]
    critical = 1.95 * math.sqrt(2 / draws)  # two-sample KS at alpha = 0.001
    assert _ks_statistic(np.array(fast_area), np.array(ref_area)) < critical
    assert _ks_statistic(np.array(fast_logr), np.array(ref_logr)) < critical
    assert min(fast_area) >= scale[0] * 0.9 and max(fast_area) <= 1.0
    assert abs(flips / draws - 0.5) < 4 * math.sqrt(0.25 / draws)
    # sanity of the test itself: a different scale range is told apart
    other = [_torchvision_get_params(width, height, rng, (0.5, 1.0)) for _ in range(draws)]
    assert _ks_statistic(np.array(fast_area), np.array([h * w / (width * height) for _, _, h, w in other])) > critical


# --------------------------------------------------------------------------------- fast decode
def test_draft_scale_keeps_the_crop_at_least_ratio_times_the_output():
    assert draft_scale(447, 500, 224, 224) == 1
    assert draft_scale(448, 448, 224, 224) == 2
    assert draft_scale(1800, 1000, 224, 224) == 4
    assert draft_scale(300, 300, 224, 224, ratio=0.5) == 2
    assert draft_scale(5000, 5000, 224, 224, ratio=0.0) == 1
    assert decode_ratio(False) == 0 and decode_ratio(True) == 1.0 and decode_ratio(0.5) == 0.5


@pytest.mark.parametrize("method", ["mae", "cae"])
def test_fast_decode_draws_the_same_crops_and_changes_pixels_only_slightly(tmp_path, method):
    root = _folder(tmp_path, [(400, 300), (320, 480), (512, 384), (300, 300)])
    transform = _transforms(size=32)[method]
    exact = SeededSamples(ImageFolder(root, transform), seed=3)
    reduced = SeededSamples(ImageFolder(root, transform, fast_decode=True), seed=3)
    scales = []
    original = ImageSource.decode

    def spy(self, *args, **kwargs):
        img, scale = original(self, *args, **kwargs)
        scales.append(scale)
        return img, scale

    ImageSource.decode = spy
    try:
        pairs = [(exact[i], reduced[i]) for i in range(len(exact))]
    finally:
        ImageSource.decode = original
    assert any(s > 1 for s in scales)  # crops of >= 64 px for a 32 px output: reduced decodes
    for a, b in pairs:
        for key in a:
            if key.startswith("images") or key.startswith("tokenizer_images"):
                assert a[key].shape == b[key].shape
                diff = np.abs(a[key].astype(np.float32) - b[key].astype(np.float32))
                assert diff.mean() < 4.0, (key, diff.mean())  # in 0..255 units
            else:
                np.testing.assert_array_equal(a[key], b[key])  # masks, noise, labels


def test_pretrain_batches_of_the_folder_loader_are_uint8_and_reproducible(tmp_path):
    from paddle_cae.data.loader import build_loader

    root = _folder(tmp_path, [(64, 48)] * 6)
    ds = ImageFolder(root, _transforms()["cae"])
    batches = []
    for workers in (0, 1):
        loader = build_loader(ds, batch_size=3, shuffle=True, num_workers=workers, seed=2, epoch=1)
        batches.append({k: v.numpy() for k, v in next(iter(loader)).items()})
    assert batches[0]["images"].dtype == np.uint8
    for key in batches[0]:
        np.testing.assert_array_equal(batches[0][key], batches[1][key])


# ------------------------------------------------------------------------------ sample generators
def test_reused_sample_generators_draw_like_fresh_ones_and_nest():
    def draws(seed):
        from paddle_cae.data.transforms import numpy_rng, python_rng

        with sample_rng(seed):
            first = (python_rng().random(), float(numpy_rng().random_sample()))
            with sample_rng(seed + 1):
                inner = (python_rng().random(), float(numpy_rng().random_sample()))
            after = (python_rng().random(), float(numpy_rng().random_sample()))
        return first, inner, after

    for seed in (0, 7, 2 ** 40 + 3):
        fresh_py, fresh_np = random.Random(seed), np.random.RandomState(seed & 0xFFFFFFFF)
        first, inner, after = draws(seed)
        assert first == (fresh_py.random(), float(fresh_np.random_sample()))
        assert after == (fresh_py.random(), float(fresh_np.random_sample()))  # inner block did not disturb
        assert inner == (random.Random(seed + 1).random(),
                         float(np.random.RandomState((seed + 1) & 0xFFFFFFFF).random_sample()))
        assert draws(seed) == (first, inner, after)


def test_data_throughput_benchmark_prints_every_pipeline_and_ratio(tmp_path, capsys):
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("data_throughput",
                                                  os.path.join(root, "benchmarks", "data_throughput.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    _folder(tmp_path, [(120, 90), (90, 120), (100, 100), (130, 80)])
    bench.main(["--data_path", str(tmp_path), "--images", "4", "--batch_size", "2", "--rounds", "1",
                "--input_size", "32", "--workers"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] and
            line.split()[0] in bench.METHODS}
    assert sorted(rows) == sorted(bench.METHODS)
    for cells in rows.values():  # official, then (rate, ratio) per package variant
        official, rate, ratio = float(cells[1]), float(cells[2]), float(cells[3])
        assert official > 0 and rate > 0 and ratio == pytest.approx(rate / official, rel=0.02, abs=0.01)
    assert "cores per node" in out and "load average" in out


def test_pretraining_flags_reach_the_dataset():
    """--data_handover and --fast_decode of main_pretrain.py configure the training set."""
    from paddle_cae.data.datasets import build_dataset
    from paddle_cae.runtime.pretrain_args import parse_pretrain_args

    args = parse_pretrain_args(["--config", "demo/mae", "--data_handover", "float32", "--fast_decode", "0.5"])
    dataset = build_dataset("train", None, None, options=args)
    assert (dataset.handover, dataset.fast_decode) == ("float32", 0.5)
    default = build_dataset("train", None, None, options=parse_pretrain_args(["--config", "demo/mae"]))
    assert (default.handover, default.fast_decode) == ("uint8", 0.0)
    from paddle_cae.runtime.config import ConfigError

    with pytest.raises(ConfigError, match="fast_decode"):
        parse_pretrain_args(["--fast_decode", "2"])
