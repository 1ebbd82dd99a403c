"""The pretraining pipelines (paddle_cae.data.pipeline, the methods' stages): the same draws and
pixels as the recipes' definitions written with the PIL transforms, uint8 hand-over converted in
the training step, the exact C resampler swapped in (paddle_cae.fast.data), optional reduced
JPEG decoding."""
import math
import random

import numpy as np
import paddle
import pytest
from PIL import Image

from paddle_cae.data.datasets import ImageFolder
from paddle_cae.data.loader import SeededSamples, collate_samples
from paddle_cae.data.masking import BlockMaskGenerator, bootmae_shuffle_from_mask
from paddle_cae.data.pipeline import (PILLOW, ImageSource, decode_ratio, draft_scale, to_model_floats,
                                      use_resampler)
from paddle_cae.data.transforms import (HALF_MEAN, HALF_STD, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD,
                                        Compose, MapPixels, Normalize, RandomHorizontalFlip,
                                        RandomResizedCrop, ToTensor, bool_mask, numpy_rng, resized_crop,
                                        sample_rng)
from paddle_cae.fast.data import ExactResampler
from paddle_cae.methods.bootmae import BootMAEPipeline
from paddle_cae.methods.cae import CAEPipeline
from paddle_cae.methods.mae import MAEPipeline


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


def _blocks(grid, count=6, max_block=None):
    return BlockMaskGenerator((grid, grid), count, max_num_patches=max_block, min_num_patches=2)


def _transforms(size=32, grid=4):
    return {
        "mae": MAEPipeline(size, num_patches=grid * grid),
        "bootmae": BootMAEPipeline(_blocks(grid, 8, 4), input_size=size, mask_num=6),
        "cae": CAEPipeline(_blocks(grid), size, size // 2),
    }


# the recipes' definitions, PIL image in, float32 out, from the generic PIL transforms: what
# the pipelines' samples were when each method had its own PIL-to-float32 class
def _reference_crop_flip(size, scale, mean, std):
    return Compose([RandomResizedCrop(size, scale=scale), RandomHorizontalFlip(), ToTensor(),
                    Normalize(mean, std)])


def _reference(method, size=32, grid=4):
    if method == "mae":
        steps = _reference_crop_flip(size, (0.2, 1.0), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        return lambda img: {"images": steps(img),
                            "noise": numpy_rng().random_sample(grid * grid).astype(np.float32)}
    if method == "bootmae":
        steps, blocks = _reference_crop_flip(size, (0.2, 1.0), HALF_MEAN, HALF_STD), _blocks(grid, 8, 4)

        def bootmae(img):
            mask = bool_mask(blocks)  # mask and order first, then the crop
            order, _ = bootmae_shuffle_from_mask(mask.reshape(grid, grid).astype(np.int64), 6,
                                                 rng=numpy_rng(), roll=0)
            return {"images": steps(img), "bool_masked_pos": mask, "order": order}
        return bootmae
    blocks, flip = _blocks(grid), RandomHorizontalFlip()
    normalise = Compose([ToTensor(), Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    map_pixels = Compose([ToTensor(), MapPixels(0.1)])

    def cae(img):
        img = flip(img)  # flip the whole image, then one box resized twice
        top, left, h, w = RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
        view = resized_crop(img, top, left, h, w, size, Image.BICUBIC)
        tokenizer_view = resized_crop(img, top, left, h, w, size // 2, Image.LANCZOS)
        return {"images": normalise(view), "tokenizer_images": map_pixels(tokenizer_view),
                "bool_masked_pos": bool_mask(blocks)}
    return cae


RESAMPLERS = {"pillow": PILLOW, "exact": ExactResampler()}


def _to_paddle(batch):
    return {k: paddle.to_tensor(v) for k, v in batch.items()}


# ----------------------------------------------------------------- same samples as the reference
@pytest.mark.parametrize("resampler", sorted(RESAMPLERS))
@pytest.mark.parametrize("method", ["mae", "bootmae", "cae"])
def test_uint8_hand_over_gives_the_reference_float_tensors_and_masks(tmp_path, method, resampler):
    root = _folder(tmp_path, [(61, 47), (40, 64), (90, 70), (33, 33)])
    pipeline = use_resampler(_transforms()[method], RESAMPLERS[resampler])
    fast = ImageFolder(root, pipeline)
    on_cpu = ImageFolder(root, pipeline, handover="float32")
    ref = ImageFolder(root, _reference(method))
    a, c, b = (collate_samples([SeededSamples(ds, seed=11, epoch=2)[i] for i in range(4)])
               for ds in (fast, on_cpu, ref))
    assert a["images"].dtype == np.uint8 and b["images"].dtype == np.float32
    assert a["images"].nbytes * 4 == b["images"].nbytes
    assert fast.conversions and not on_cpu.conversions and not ref.conversions
    converted = to_model_floats(_to_paddle(a), fast.conversions)
    expected = _to_paddle(b)
    assert sorted(converted) == sorted(expected) == sorted(c)
    for key, value in b.items():  # the loader's conversion: the reference to the last bit
        np.testing.assert_array_equal(c[key], value, err_msg=key)
        assert c[key].dtype == value.dtype, key
    for key, value in expected.items():  # on the device
        assert converted[key].dtype == value.dtype, key
        np.testing.assert_allclose(converted[key].numpy(), value.numpy(), rtol=0, atol=1e-6,
                                   err_msg=key)
    if "bool_masked_pos" in b:  # the masks are the reference's, draw for draw
        np.testing.assert_array_equal(a["bool_masked_pos"], b["bool_masked_pos"])


def test_numpy_conversion_matches_the_paddle_one():
    pipeline = _transforms()["cae"]
    batch = {"images": np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8), dtype=np.uint8),
             "tokenizer_images": np.random.default_rng(1).integers(0, 256, (2, 3, 4, 4), dtype=np.uint8)}
    from_numpy = to_model_floats(batch, pipeline.conversions)
    from_paddle = to_model_floats(_to_paddle(batch), pipeline.conversions)
    assert sorted(from_numpy) == sorted(from_paddle) == ["images", "tokenizer_images"]
    for key in from_numpy:
        assert from_numpy[key].dtype == np.float32
        np.testing.assert_array_equal(from_numpy[key], from_paddle[key].numpy())
    # and both are the reference's ToTensor + Normalize / map_pixels
    chw = batch["images"][0].astype(np.float32) / 255.0
    np.testing.assert_array_equal(from_numpy["images"][0],
                                  Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(chw))
    tok = batch["tokenizer_images"][1].astype(np.float32) / 255.0
    np.testing.assert_array_equal(from_numpy["tokenizer_images"][1], MapPixels(0.1)(tok))
    # float entries (a float32 hand-over) are left alone
    assert to_model_floats(from_numpy, pipeline.conversions)["images"] is from_numpy["images"]


def test_an_unreadable_jpeg_is_replaced_with_the_draws_the_reference_gives_it(tmp_path):
    root = _folder(tmp_path, [(60, 50), (70, 44), (52, 66)])
    bad = sorted(root.glob("*/*.jpeg"))[0]
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) * 2 // 3])  # header intact, scan data cut: fails when decoding
    fast = ImageFolder(root, _transforms()["mae"])
    ref = ImageFolder(root, _reference("mae"))
    index = [p for p, _ in fast.samples].index(str(bad))
    with sample_rng(5):
        a = fast[index]
    with sample_rng(5):
        b = ref[index]
    assert a["replaced"] == b["replaced"] == index and index in fast.known_bad
    floats = to_model_floats({k: v[None] for k, v in a.items()}, fast.conversions)["images"][0]
    np.testing.assert_array_equal(floats, b["images"])
    np.testing.assert_array_equal(a["noise"], b["noise"])


def test_float32_hand_over_and_other_transforms(tmp_path):
    root = _folder(tmp_path, [(40, 40)])
    assert sorted(ImageFolder(root, _transforms()["cae"]).conversions) == ["images", "tokenizer_images"]
    floats = ImageFolder(root, _transforms()["mae"], handover="float32")
    assert floats.conversions == {} and floats[0]["images"].dtype == np.float32
    assert ImageFolder(root, lambda img: np.asarray(img)).conversions == {}
    with pytest.raises(ValueError, match="handover must be one of"):
        ImageFolder(root, _transforms()["mae"], handover="fp16")
    with pytest.raises(ValueError, match="fast_decode must be"):
        ImageFolder(root, _transforms()["mae"], fast_decode=2.0)


def test_accelerate_dataset_swaps_the_crop_of_pipelines_and_pil_transforms(tmp_path):
    from paddle_cae.fast import resample
    from paddle_cae.data.transforms import build_finetune_transform
    from paddle_cae.fast.data import accelerate_dataset

    root = _folder(tmp_path, [(40, 40)])
    pretrain = accelerate_dataset(ImageFolder(root, _transforms()["cae"]))
    finetune = accelerate_dataset(ImageFolder(root, build_finetune_transform(32)))
    crop = finetune.transform.transforms[0]
    if resample.library() is None:
        assert pretrain.transform.resampler is PILLOW and crop.resampler is PILLOW
    else:
        assert isinstance(pretrain.transform.resampler, ExactResampler)
        assert isinstance(crop.resampler, ExactResampler)
    assert accelerate_dataset(ImageFolder(root)).transform is None


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
        self.img, self.size, self.ratio, self.calls = img, img.size, 0.0, []

    def decode(self, crop_w, crop_h, out_w, out_h):
        self.calls.append((crop_w, crop_h))
        return self.img, 1.0


def _ks_statistic(a, b):
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, "right") / a.size - np.searchsorted(b, grid, "right") / b.size).max()


@pytest.mark.parametrize("method,scale", [("mae", (0.2, 1.0)), ("cae", (0.08, 1.0))])
def test_crop_scale_aspect_and_flip_rate_match_torchvision_over_many_draws(method, scale):
    width, height, draws = 120, 80, 3000
    ramp = np.tile(np.linspace(0, 255, width, dtype=np.float32).astype(np.uint8)[None, :, None], (height, 1, 3))
    image = Image.fromarray(ramp)  # brightness rises to the right: a flip shows
    pipeline = MAEPipeline(16) if method == "mae" else \
        CAEPipeline(BlockMaskGenerator((2, 2), 1, max_num_patches=None, min_num_patches=1), 16, 8, scale=scale)
    fast_area, fast_logr, flips = [], [], 0
    for seed in range(draws):
        source = _RecordingSource(image)
        with sample_rng(seed):
            images = pipeline(source)["images"]
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
    from paddle_cae.cli.pretrain_args import parse_pretrain_args

    args = parse_pretrain_args(["--config", "demo/mae", "--data_handover", "float32", "--fast_decode", "0.5"])
    dataset = build_dataset("train", None, None, options=args)
    assert (dataset.handover, dataset.fast_decode) == ("float32", 0.5)
    default = build_dataset("train", None, None, options=parse_pretrain_args(["--config", "demo/mae"]))
    assert (default.handover, default.fast_decode) == ("uint8", 0.0)
    from paddle_cae.runtime.config import ConfigError

    with pytest.raises(ConfigError, match="fast_decode"):
        parse_pretrain_args(["--fast_decode", "2"])
