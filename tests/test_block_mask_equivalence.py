"""BlockMaskGenerator (one int per mask row, bit operations) against a plain numpy-window
implementation of the same algorithm: the same masks, the same bookkeeping, draw for draw,
for every kind of generator it accepts."""
import math
import random

import numpy as np
import pytest

from paddle_cae.data.masking import BlockMaskGenerator


def _numpy_reference(gen, rng):
    """The algorithm of BlockMaskGenerator.draw written with numpy windows."""
    def uniform(low, high):
        if isinstance(rng, (np.random.Generator, np.random.RandomState)):
            return low + (high - low) * float(rng.random())
        return rng.uniform(low, high)

    def randint(low, high):
        if isinstance(rng, np.random.Generator):
            return int(rng.integers(low, high + 1))
        if isinstance(rng, np.random.RandomState):
            return int(rng.randint(low, high + 1))
        return rng.randint(low, high)

    mask = np.zeros((gen.height, gen.width), np.int8)
    info = {"blocks": 0, "calls": 0, "attempts": 0, "random_fill": 0}
    count = failed = 0
    while count < gen.num_masking_patches:
        budget = gen.max_failed_attempts - failed
        if not (gen.height > 1 and gen.width > 1) or budget <= 0:
            k = gen.num_masking_patches - count
            free = np.flatnonzero(mask.reshape(-1) == 0)
            if isinstance(rng, (np.random.Generator, np.random.RandomState)):
                chosen = free[rng.permutation(len(free))[:k]]
            else:
                chosen = free[rng.sample(range(len(free)), k)]
            mask.reshape(-1)[chosen] = 1
            info["random_fill"] = k
            break
        if gen.max_attempts is not None:
            budget = min(budget, gen.max_attempts)
        max_new = min(gen.num_masking_patches - count, gen.max_num_patches)
        delta, used = 0, budget
        for attempt in range(1, budget + 1):
            area = uniform(gen.min_num_patches, max_new)
            aspect = math.exp(uniform(*gen.log_aspect_ratio))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < gen.width and h < gen.height:
                top, left = randint(0, gen.height - h), randint(0, gen.width - w)
                window = mask[top:top + h, left:left + w]
                new = h * w - int(window.sum())
                if 0 < new <= max_new:
                    window[...] = 1
                    delta, used = new, attempt
                    break
        info["calls"] += 1
        info["attempts"] += used
        if delta > 0:
            info["blocks"] += 1
            count += delta
            failed = 0
        else:
            failed += used
    return mask, info


SETTINGS = [
    dict(input_size=14, num_masking_patches=75),                                   # CAE
    dict(input_size=14, num_masking_patches=120, max_num_patches=60, max_attempts=None),  # BootMAE
    dict(input_size=(7, 9), num_masking_patches=30, min_num_patches=4, max_attempts=3),
    dict(input_size=(2, 40), num_masking_patches=50, min_num_patches=1),
    dict(input_size=(1, 5), num_masking_patches=3),                                # random fill
    dict(input_size=14, num_masking_patches=196, max_failed_attempts=20),          # fallback
    dict(input_size=(70, 66), num_masking_patches=1500, max_num_patches=300),      # wide rows
]


@pytest.mark.parametrize("kind", ["python", "RandomState", "Generator"])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"{s['input_size']}-{s['num_masking_patches']}")
def test_block_masks_equal_the_numpy_window_reference(setting, kind):
    make = {"python": random.Random, "RandomState": np.random.RandomState,
            "Generator": np.random.default_rng}[kind]
    gen = BlockMaskGenerator(**setting)
    filled = 0
    for seed in range(15):
        want, want_info = _numpy_reference(gen, make(seed))
        got, info = gen.draw(make(seed))
        assert got.dtype == np.int8 and got.shape == want.shape
        assert np.array_equal(got, want), (setting, kind, seed)
        assert info == want_info
        assert int(got.sum()) == setting["num_masking_patches"]
        filled += info["random_fill"]
    if setting["input_size"] == (1, 5):
        assert filled == 15 * 3  # the fallback path was compared too
