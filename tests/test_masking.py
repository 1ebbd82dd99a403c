import json
import random
from pathlib import Path

import numpy as np
import pytest

from paddle_cae.data.masking import (
    BlockMaskGenerator,
    RandomMaskGenerator,
    bootmae_mask_generator,
    bootmae_shuffle_from_mask,
)

STATS = Path(__file__).parent / "fixtures" / "block_mask_stats" / "stats.json"


# ------------------------------------------------------------------------- random masks
@pytest.mark.parametrize("grid, ratio, expected", [
    (14, 0.75, 147), (14, 0.4, 78), ((7, 9), 0.5, 31), (14, 0.0, 0), (14, 1.0, 196), (1, 0.5, 0),
])
def test_random_mask_has_exactly_int_ratio_times_n_masked(grid, ratio, expected):
    gen = RandomMaskGenerator(grid, mask_ratio=ratio, rng=np.random.default_rng(0))
    shape = (grid, grid) if isinstance(grid, int) else grid
    for _ in range(20):
        mask = gen()
        assert mask.shape == shape
        assert int(mask.sum()) == expected
        assert set(np.unique(mask)) <= {0, 1}


def test_random_mask_accepts_a_count_and_needs_exactly_one_of_ratio_or_count():
    assert int(RandomMaskGenerator((4, 5), num_masking_patches=7)().sum()) == 7
    with pytest.raises(ValueError):
        RandomMaskGenerator(14)
    with pytest.raises(ValueError):
        RandomMaskGenerator(14, mask_ratio=0.5, num_masking_patches=3)
    with pytest.raises(ValueError):
        RandomMaskGenerator(4, num_masking_patches=17)


@pytest.mark.parametrize("make_rng", [lambda: np.random.default_rng(3), lambda: random.Random(3), lambda: 3])
def test_random_mask_is_reproducible_with_the_same_seed(make_rng):
    a = RandomMaskGenerator(14, mask_ratio=0.75, rng=make_rng())
    b = RandomMaskGenerator(14, mask_ratio=0.75, rng=make_rng())
    draws_a, draws_b = [a() for _ in range(5)], [b() for _ in range(5)]
    for x, y in zip(draws_a, draws_b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(draws_a[0], d) for d in draws_a[1:])


def test_random_mask_positions_are_uniform():
    gen = RandomMaskGenerator(4, mask_ratio=0.5, rng=np.random.default_rng(1))
    frequency = np.mean([gen() for _ in range(4000)], axis=0)
    assert np.all(np.abs(frequency - 0.5) < 0.04)


# -------------------------------------------------------------------------- block masks
def test_block_mask_has_exact_count_over_many_random_settings():
    settings = random.Random(1234)
    for _ in range(400):
        height, width = settings.randint(1, 16), settings.randint(1, 16)
        count = settings.randint(0, height * width)
        max_patches = settings.choice([None, settings.randint(1, 80)])
        min_aspect = settings.uniform(0.1, 1.0)
        gen = BlockMaskGenerator(
            (height, width), count, min_num_patches=settings.randint(1, 60), max_num_patches=max_patches,
            min_aspect=min_aspect, max_attempts=settings.choice([10, 1, None]),
            rng=random.Random(settings.random()))
        mask = gen()
        assert mask.shape == (height, width)
        assert mask.dtype == np.int8
        assert int(mask.sum()) == count, repr(gen)
        assert set(np.unique(mask)) <= {0, 1}


@pytest.mark.parametrize("kwargs", [
    dict(input_size=14, num_masking_patches=0),
    dict(input_size=14, num_masking_patches=196),
    dict(input_size=(2, 2), num_masking_patches=4),
    dict(input_size=14, num_masking_patches=98, min_num_patches=50, max_num_patches=10),
    dict(input_size=14, num_masking_patches=98, min_num_patches=500),
    dict(input_size=14, num_masking_patches=5, max_num_patches=1),
    dict(input_size=(1, 12), num_masking_patches=5),
    dict(input_size=(12, 1), num_masking_patches=12),
    dict(input_size=1, num_masking_patches=1),
    dict(input_size=14, num_masking_patches=120, max_attempts=None, max_num_patches=60),
])
def test_block_mask_has_exact_count_in_edge_cases(kwargs):
    gen = BlockMaskGenerator(rng=random.Random(7), **kwargs)
    for _ in range(10):
        assert int(gen().sum()) == kwargs["num_masking_patches"]


def test_block_mask_uses_random_fill_only_when_no_block_can_fit():
    line = BlockMaskGenerator((1, 12), 5, rng=random.Random(0))
    mask, info = line.draw()
    assert info["random_fill"] == 5 and info["blocks"] == 0 and int(mask.sum()) == 5

    recipe = BlockMaskGenerator(14, 98, min_num_patches=16, rng=random.Random(0))
    for _ in range(300):
        _, info = recipe.draw()
        assert info["random_fill"] == 0


def test_block_mask_falls_back_after_the_failed_attempt_budget():
    # a rectangle must be narrower and shorter than the grid, so on a 2x2 grid only 1x1
    # blocks fit; with a 4..4 area target they are never drawn and the budget runs out
    gen = BlockMaskGenerator((2, 2), 3, min_num_patches=4, min_aspect=1.0, max_aspect=1.0,
                             max_failed_attempts=50, rng=random.Random(0))
    mask, info = gen.draw()
    assert int(mask.sum()) == 3
    assert info["random_fill"] == 3
    assert info["attempts"] == 50


def test_block_mask_is_reproducible_with_the_same_seed():
    for make_rng in (lambda: random.Random(11), lambda: np.random.default_rng(11), lambda: 11):
        a = BlockMaskGenerator(14, 98, rng=make_rng())
        b = BlockMaskGenerator(14, 98, rng=make_rng())
        draws_a, draws_b = [a() for _ in range(5)], [b() for _ in range(5)]
        for x, y in zip(draws_a, draws_b):
            np.testing.assert_array_equal(x, y)
        assert any(not np.array_equal(draws_a[0], d) for d in draws_a[1:])


def test_block_mask_rng_given_per_call_overrides_the_generator_rng():
    gen = BlockMaskGenerator(14, 75, rng=random.Random(1))
    np.testing.assert_array_equal(gen(random.Random(5)), BlockMaskGenerator(14, 75)(random.Random(5)))


def test_block_mask_without_rng_uses_the_global_random_module():
    gen = BlockMaskGenerator(14, 75)
    random.seed(42)
    first = gen()
    random.seed(42)
    np.testing.assert_array_equal(gen(), first)


def test_block_mask_follows_the_official_random_stream():
    """Python's ``random`` seeded as in stats.json replays the reference draws exactly: the
    per-draw counts of accepted blocks and of block calls, and the bounding boxes, average
    to the very same values."""
    stats = json.loads(STATS.read_text())
    for key, ref in stats.items():
        gen = BlockMaskGenerator(tuple(ref["grid"]), ref["num_masking_patches"],
                                 min_num_patches=ref["min_num_patches"], max_num_patches=None,
                                 min_aspect=ref["min_aspect"])
        rng = random.Random(ref["python_random_seed"])
        blocks, calls, bbox = [], [], []
        for _ in range(ref["draws"]):
            mask, info = gen.draw(rng)
            rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
            blocks.append(info["blocks"])
            calls.append(info["calls"])
            bbox.append((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1))
        assert np.mean(blocks) == pytest.approx(ref["successful_blocks_per_mask"]["mean"], abs=1e-9), key
        assert np.mean(calls) == pytest.approx(ref["_mask_calls_per_mask"]["mean"], abs=1e-9), key
        assert np.mean(bbox) == pytest.approx(ref["bbox_area_of_all_masked"]["mean"], abs=1e-9), key


def test_block_mask_blocks_respect_max_num_patches():
    gen = bootmae_mask_generator(rng=random.Random(2))
    for _ in range(200):
        mask, info = gen.draw()
        assert int(mask.sum()) == 120
        # every accepted block adds at most 60 cells, so 120 cells need at least 2 blocks
        assert info["blocks"] >= 2


def test_block_mask_rejects_impossible_counts():
    with pytest.raises(ValueError, match="num_masking_patches"):
        BlockMaskGenerator(14, 197)
    with pytest.raises(ValueError, match="num_masking_patches"):
        BlockMaskGenerator(14, -1)
    with pytest.raises(ValueError, match="max_num_patches"):
        BlockMaskGenerator(14, 10, max_num_patches=0)


def test_bootmae_generator_uses_the_bootmae_recipe():
    gen = bootmae_mask_generator()
    assert (gen.height, gen.width) == (14, 14)
    assert gen.num_masking_patches == 120
    assert gen.max_num_patches == 60
    assert gen.min_num_patches == 16
    assert gen.max_attempts is None


# ------------------------------------------------------------------------ BootMAE shuffle
def _block_masks(batch, seed):
    gen = bootmae_mask_generator(rng=random.Random(seed))
    return np.stack([gen() for _ in range(batch)])


def test_bootmae_shuffle_puts_visible_patches_first_before_the_roll():
    masks = _block_masks(3, seed=0)                                    # [3, 14, 14], 120 masked
    idx, _ = bootmae_shuffle_from_mask(masks, 147, rng=np.random.default_rng(0), roll=0)
    flat = masks.reshape(3, -1)
    for b in range(3):
        assert sorted(idx[b].tolist()) == list(range(196))
        order = flat[b][idx[b]]
        assert np.all(order[:76] == 0) and np.all(order[76:] == 1)


@pytest.mark.parametrize("roll", [0, 1, 2, 3])
def test_bootmae_shuffle_roll_moves_masked_patches_to_the_front(roll):
    masks = _block_masks(4, seed=1)
    idx, loss_mask = bootmae_shuffle_from_mask(masks, 147, rng=np.random.default_rng(1), roll=roll)
    flat = masks.reshape(4, -1)
    for b in range(4):
        order = flat[b][idx[b]]
        assert np.all(order[:roll] == 1)
        assert np.all(order[roll:roll + 76] == 0)
        kept = idx[b][:196 - 147]
        # the encoder sees `roll` block-masked patches and 49 - roll visible ones
        assert int(flat[b][kept].sum()) == roll


def test_bootmae_loss_mask_marks_exactly_the_dropped_patches():
    masks = _block_masks(2, seed=2)
    idx, loss_mask = bootmae_shuffle_from_mask(masks, 147, rng=np.random.default_rng(2))
    assert loss_mask.shape == (2, 14, 14)
    assert idx.dtype == np.int64 and idx.shape == (2, 196)
    for b in range(2):
        flat = loss_mask[b].reshape(-1)
        assert int(flat.sum()) == 147
        assert np.all(flat[idx[b][:49]] == 0) and np.all(flat[idx[b][49:]] == 1)


def test_bootmae_shuffle_draws_one_roll_in_0_to_3_for_the_whole_batch():
    masks = _block_masks(4, seed=3)
    flat = masks.reshape(4, -1)
    seen = set()
    rng = random.Random(4)
    for _ in range(60):
        idx, _ = bootmae_shuffle_from_mask(masks, 147, rng=rng)
        leading = {int(np.argmin(flat[b][idx[b]])) for b in range(4)}  # masked patches before the first visible
        assert len(leading) == 1
        seen |= leading
    assert seen == {0, 1, 2, 3}


def test_bootmae_shuffle_is_reproducible_and_accepts_a_single_mask():
    mask = _block_masks(1, seed=5)[0]
    a = bootmae_shuffle_from_mask(mask, 147, rng=np.random.default_rng(9))
    b = bootmae_shuffle_from_mask(mask, 147, rng=np.random.default_rng(9))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape == (196,) and a[1].shape == (14, 14)
    with pytest.raises(ValueError, match="mask_num"):
        bootmae_shuffle_from_mask(mask, 197)
