"""The exact C crop + resize (paddle_cae/fast/resample.c) against Pillow, bit for bit, and its
fallbacks."""
import logging
import multiprocessing
import os
import random

import numpy as np
import pytest
from PIL import Image

from paddle_cae.fast import resample
from paddle_cae.fast.resample import FILTERS, crop_resize, pil_crop_resize, resize_box

NAMES = {Image.LANCZOS: "lanczos", Image.BILINEAR: "bilinear", Image.BICUBIC: "bicubic",
         Image.BOX: "box", Image.HAMMING: "hamming"}


@pytest.fixture(scope="module")
def lib():
    resample.reset()
    lib = resample.library()
    if lib is None:
        pytest.skip(f"C resampler unavailable here: {resample.unavailable_reason()}")
    return lib


@pytest.fixture
def fresh_state():
    """library() tried again in the test, and afterwards for the next tests."""
    resample.reset()
    yield
    resample.reset()


def _image(rng, w, h):
    return Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _random_case(r, w_img, h_img):
    """A crop box (borders, full size and tiny boxes included) and an output size (up, down,
    unchanged, the pretraining sizes)."""
    w = r.choice([w_img, 1, r.randint(1, w_img)])
    h = r.choice([h_img, 1, r.randint(1, h_img)])
    left = r.choice([0, w_img - w, r.randint(0, w_img - w)])
    top = r.choice([0, h_img - h, r.randint(0, h_img - h)])
    out_w = r.choice([w, 224, 112, r.randint(1, 300), max(1, w // 3)])
    out_h = r.choice([h, 224, 112, r.randint(1, 300), max(1, h // 2)])
    return (left, top, left + w, top + h), (out_w, out_h)


@pytest.mark.parametrize("resample_filter", FILTERS, ids=lambda f: NAMES[f])
def test_crop_resize_equals_pil_crop_then_resize_bit_for_bit(lib, resample_filter):
    r, rng = random.Random(resample_filter), np.random.RandomState(resample_filter)
    compared = 0
    for _ in range(40):
        img = _image(rng, r.randint(1, 260), r.randint(1, 260))
        for _ in range(2):
            box, size = _random_case(r, *img.size)
            mirror_src, mirror_out = r.random() < 0.5, r.random() < 0.5
            want = pil_crop_resize(img, box, size, resample_filter, mirror_src, mirror_out)
            for scalar, packed in ((False, False), (False, True), (True, False)):
                got = crop_resize(img, box, size, resample_filter, mirror_src, mirror_out,
                                  scalar=scalar, packed=packed)
                assert got.dtype == np.uint8 and got.shape == (3, size[1], size[0])
                assert got.flags.c_contiguous
                assert np.array_equal(got, want), (img.size, box, size, mirror_src, mirror_out,
                                                   scalar, packed)
                compared += 1
    assert compared == 40 * 2 * 3


def test_pretraining_crops_of_photo_sized_images_are_exact(lib):
    """ImageNet-sized images, RandomResizedCrop-like boxes, the CAE/MAE outputs."""
    r, rng = random.Random(1), np.random.RandomState(1)
    for _ in range(12):
        img = _image(rng, r.randint(300, 640), r.randint(300, 640))
        w_img, h_img = img.size
        w, h = r.randint(100, w_img), r.randint(100, h_img)
        left, top = r.randint(0, w_img - w), r.randint(0, h_img - h)
        box = (left, top, left + w, top + h)
        for size, f in (((224, 224), Image.BICUBIC), ((112, 112), Image.LANCZOS),
                        ((224, 224), Image.BILINEAR)):
            for mirror_src, mirror_out in ((False, False), (False, True), (True, False)):
                want = pil_crop_resize(img, box, size, f, mirror_src, mirror_out)
                assert np.array_equal(crop_resize(img, box, size, f, mirror_src, mirror_out), want)


def test_resize_with_a_float_box_equals_pil(lib):
    r, rng = random.Random(2), np.random.RandomState(2)
    for n in range(60):
        img = _image(rng, r.randint(1, 200), r.randint(1, 200))
        w, h = img.size
        b0, b1 = r.uniform(0, w * 0.9), r.uniform(0, h * 0.9)
        span = (b0, b1, r.uniform(b0 + 1e-3, w), r.uniform(b1 + 1e-3, h))
        size = (r.randint(1, 250), r.randint(1, 250))
        f = FILTERS[n % len(FILTERS)]
        mirror_src, mirror_out = n % 2 == 0, n % 3 == 0
        want = pil_crop_resize(img, None, size, f, mirror_src, mirror_out, span=span)
        assert np.array_equal(resize_box(img, span, size, f, mirror_src, mirror_out), want), \
            (img.size, span, size, f)


def test_pass_order_zero_is_horizontal_then_vertical_as_older_pillow(lib):
    """Pillow up to 12 always runs the horizontal pass first; Pillow 13 runs the vertical one
    first when the height shrinks much more than the width. Order 0 must equal the two
    single-axis resizes in that order (what older Pillow computes), order 1 Pillow 13's rule;
    the loaded library uses the order of the installed Pillow."""
    r, rng = random.Random(3), np.random.RandomState(3)
    differs = 0
    for n in range(60):
        img = _image(rng, r.randint(8, 150), r.randint(8, 150))
        w, h = img.size
        size = (r.randint(4, 200), r.randint(2, 200))
        f = (Image.BICUBIC, Image.BILINEAR, Image.LANCZOS)[n % 3]
        h_first = np.asarray(img.resize((size[0], h), f).resize(size, f)).transpose(2, 0, 1)
        v_first = np.asarray(img.resize((w, size[1]), f).resize(size, f)).transpose(2, 0, 1)
        box = (0, 0, w, h)
        assert np.array_equal(crop_resize(img, box, size, f, order=0), h_first)
        shrink_h, shrink_w = h - size[1], w - size[0]
        rule = v_first if size[0] != w and size[1] != h and shrink_h > max(0, 2 * shrink_w) else h_first
        assert np.array_equal(crop_resize(img, box, size, f, order=1), rule)
        differs += int(not np.array_equal(h_first, v_first))
    assert differs > 10  # the cases tell the orders apart
    probe = _image(rng, 23, 31)
    assert np.array_equal(crop_resize(probe, (0, 0, 23, 31), (40, 9), Image.BILINEAR),
                          pil_crop_resize(probe, (0, 0, 23, 31), (40, 9), Image.BILINEAR))


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_every_compiled_code_path_matches_pil(monkeypatch, tmp_path, fresh_state, isa):
    """The AVX2 and the plain C builds (the machine's best one is tested above)."""
    monkeypatch.setenv("PADDLE_CAE_RESAMPLE_ISA", isa)
    monkeypatch.setenv("PADDLE_CAE_OPS_DIR", str(tmp_path))
    if resample._isa()[0] != isa:
        pytest.skip(f"this CPU cannot run the {isa} build")
    lib = resample.library()
    if lib is None and "no C compiler" in (resample.unavailable_reason() or ""):
        pytest.skip(resample.unavailable_reason())
    assert lib is not None, resample.unavailable_reason()
    assert os.path.basename(resample.build_dir()).endswith(isa)
    assert lib.pc_vector_taps() == {"avx2": 2, "generic": 1}[isa]
    r, rng = random.Random(4), np.random.RandomState(4)
    for n in range(30):
        img = _image(rng, r.randint(1, 200), r.randint(1, 200))
        box, size = _random_case(r, *img.size)
        f = FILTERS[n % len(FILTERS)]
        want = pil_crop_resize(img, box, size, f, n % 2 == 0, n % 3 == 0)
        for packed in (False, True):
            got = crop_resize(img, box, size, f, n % 2 == 0, n % 3 == 0, lib=lib, packed=packed)
            assert np.array_equal(got, want), (img.size, box, size, f, packed)


def test_what_the_c_code_does_not_do_is_left_to_pil(lib):
    img = _image(np.random.RandomState(5), 30, 20)
    assert crop_resize(img, (0, 0, 10, 10), (5, 5), Image.NEAREST) is None
    assert crop_resize(img.convert("L"), (0, 0, 10, 10), (5, 5), Image.BICUBIC) is None
    assert crop_resize(img, (-1, 0, 10, 10), (5, 5), Image.BICUBIC) is None  # PIL pads
    assert crop_resize(img, (0, 0, 31, 10), (5, 5), Image.BICUBIC) is None
    assert crop_resize(img, (0.5, 0, 10, 10), (5, 5), Image.BICUBIC) is None


def test_switched_off_by_the_environment(monkeypatch, fresh_state, caplog):
    monkeypatch.setenv("PADDLE_CAE_FAST_RESIZE", "0")
    with caplog.at_level(logging.INFO, logger="paddle_cae"):
        assert resample.library() is None
        assert resample.library() is None
    assert resample.unavailable_reason() == "PADDLE_CAE_FAST_RESIZE=0"
    assert sum("crop+resize off" in rec.getMessage() for rec in caplog.records) == 1  # once
    img = _image(np.random.RandomState(6), 30, 20)
    assert crop_resize(img, (0, 0, 10, 10), (7, 7), Image.BICUBIC) is None


def test_no_compiler_falls_back_with_one_warning(monkeypatch, tmp_path, fresh_state, caplog):
    monkeypatch.setenv("PADDLE_CAE_OPS_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="paddle_cae"):
        assert resample.library() is None
        assert resample.library() is None
    assert "no C compiler" in resample.unavailable_reason()
    assert sum("crop+resize off" in rec.getMessage() for rec in caplog.records) == 1


def test_a_pillow_that_computes_differently_is_detected(monkeypatch, fresh_state):
    """The start-up self-check compares with the installed Pillow; a difference (another
    Pillow's arithmetic, simulated here) turns the C code off."""
    original = resample.pil_crop_resize

    def other_pillow(*args, **kwargs):
        out = original(*args, **kwargs).copy()
        out[0, 0, 0] ^= 1
        return out

    resample.library()
    if resample.unavailable_reason() is not None:
        pytest.skip(f"C resampler unavailable here: {resample.unavailable_reason()}")
    resample.reset()
    monkeypatch.setattr(resample, "pil_crop_resize", other_pillow)
    assert resample.library() is None
    assert "differs from Pillow" in resample.unavailable_reason()


def test_the_fast_pipeline_gives_the_reference_pixels_without_the_c_code(monkeypatch, tmp_path,
                                                                          fresh_state):
    from paddle_cae.data.masking import BlockMaskGenerator
    from paddle_cae.data.pipeline import ImageSource, use_resampler
    from paddle_cae.data.transforms import sample_rng
    from paddle_cae.fast.data import ExactResampler
    from paddle_cae.methods.cae import CAEPipeline
    from paddle_cae.methods.mae import MAEPipeline

    path = str(tmp_path / "a.jpg")
    _image(np.random.RandomState(7), 90, 70).save(path, quality=90)
    pipelines = [MAEPipeline(32),
                 CAEPipeline(BlockMaskGenerator((2, 2), 1, max_num_patches=None, min_num_patches=1), 32, 16)]
    if resample.library() is None:
        pytest.skip(f"C resampler unavailable here: {resample.unavailable_reason()}")
    for pipeline in pipelines:
        use_resampler(pipeline, ExactResampler())
    outputs = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("PADDLE_CAE_FAST_RESIZE", switch)
        resample.reset()
        assert (resample.library() is None) == (switch == "0")
        for k, pipeline in enumerate(pipelines):
            for seed in range(4):
                with sample_rng(seed):
                    sample = pipeline(ImageSource(path))
                outputs.setdefault((k, seed), []).append(sample)
    for (k, seed), (fast, plain) in outputs.items():
        for key in fast:
            assert np.array_equal(fast[key], plain[key]), (k, seed, key)


def _child(queue, box, size, f):
    img = Image.open(queue.get()).convert("RGB")
    queue.put((resample.NATIVE.tried and resample.library() is not None, crop_resize(img, box, size, f)))


def test_works_in_a_forked_worker(lib, tmp_path):
    path = str(tmp_path / "b.png")
    img = _image(np.random.RandomState(8), 120, 90)
    img.save(path)
    assert resample.library() is not None
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    queue.put(path)
    proc = ctx.Process(target=_child, args=(queue, (10, 5, 110, 80), (56, 48), Image.BICUBIC))
    proc.start()
    proc.join()
    assert proc.exitcode == 0
    inherited, got = queue.get()
    assert inherited  # loaded by the parent before the fork
    assert np.array_equal(got, pil_crop_resize(img, (10, 5, 110, 80), (56, 48), Image.BICUBIC))


def test_accelerating_a_dataset_loads_the_resampler_before_workers_fork(tmp_path, fresh_state):
    from paddle_cae.data.datasets import ImageFolder
    from paddle_cae.fast.data import accelerate_dataset
    from paddle_cae.methods.mae import MAEPipeline

    (tmp_path / "a").mkdir()
    _image(np.random.RandomState(9), 40, 30).save(tmp_path / "a" / "x.png")
    accelerate_dataset(ImageFolder(str(tmp_path), transform=None))
    assert not resample.NATIVE.tried  # no transform: nothing to crop
    ImageFolder(str(tmp_path), transform=MAEPipeline(16))
    assert not resample.NATIVE.tried  # the reference data path never loads it
    accelerate_dataset(ImageFolder(str(tmp_path), transform=MAEPipeline(16), handover="float32"))
    assert resample.NATIVE.tried


def test_reference_resized_crop_gives_pil_pixels_with_and_without_the_c_code(monkeypatch, fresh_state):
    from paddle_cae.data.transforms import resized_crop
    from paddle_cae.fast.data import ExactResampler

    img = _image(np.random.RandomState(10), 150, 110)
    want = img.crop((7, 3, 7 + 120, 3 + 90)).resize((64, 48), Image.BICUBIC)
    got = resized_crop(img, 3, 7, 90, 120, (48, 64), Image.BICUBIC)  # the reference: Pillow
    assert np.array_equal(np.asarray(got), np.asarray(want))
    for switch in ("1", "0"):
        monkeypatch.setenv("PADDLE_CAE_FAST_RESIZE", switch)
        resample.reset()
        got = resized_crop(img, 3, 7, 90, 120, (48, 64), Image.BICUBIC, ExactResampler())
        assert got.mode == "RGB" and got.size == (64, 48)
        assert np.array_equal(np.asarray(got), np.asarray(want)), switch
    assert resample.library() is None  # the second round ran PIL's code


def test_an_image_in_several_memory_blocks_gives_the_same_pixels(lib):
    """Pillow keeps big images in several memory blocks (16 MiB each by default), which its
    Arrow export (Pillow 13) refuses: the pixels are then read from a packed copy."""
    core = Image.core
    if not hasattr(core, "set_block_size"):
        pytest.skip("this Pillow has no block size setting")
    old = core.get_block_size()
    core.set_block_size(4096)  # a 120-px RGB row is 480 bytes: 8 rows a block
    try:
        img = _image(np.random.RandomState(11), 120, 100).copy()
        for mirror_src in (False, True):
            want = pil_crop_resize(img, (5, 3, 110, 97), (50, 70), Image.BICUBIC, mirror_src)
            assert np.array_equal(crop_resize(img, (5, 3, 110, 97), (50, 70), Image.BICUBIC,
                                              mirror_src), want)
    finally:
        core.set_block_size(old)
