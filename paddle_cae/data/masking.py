"""Mask generators for masked image modeling, on the patch grid.

Every generator returns a numpy ``int8`` array of shape ``[H, W]`` with 1 = masked;
callers flatten it row-major (``mask.reshape(-1)``) to index the ``N = H * W`` patches.

* :class:`RandomMaskGenerator` - exactly ``int(ratio * N)`` patches at uniformly random
  positions (CAE ``--mask_generator random``).
* :class:`BlockMaskGenerator` - BEiT's block-wise generator as CAE and BootMAE use it:
  rectangles of random area and log-uniform aspect ratio are added until exactly
  ``num_masking_patches`` cells are masked.
* :func:`bootmae_mask_generator` - the BootMAE setting (blocks of at most 60 patches,
  120 in total, every block retried until it fits).
* :func:`bootmae_shuffle_from_mask` - BootMAE's mask -> shuffle index step (visible
  patches first, a small cyclic roll, a fixed number of dropped patches).

Randomness: each function takes ``rng``, which may be a ``random.Random``, a
``numpy.random.Generator``/``RandomState``, an int seed, or ``None`` (the global
``random`` module for the block generator, as the official code uses it, and the global
numpy state for the others). A ``random.Random`` makes the same calls as the official
generator, so seeding it equally reproduces the official masks draw for draw.
"""
import math
import random

import numpy as np

__all__ = [
    "RandomMaskGenerator",
    "BlockMaskGenerator",
    "bootmae_mask_generator",
    "bootmae_shuffle_from_mask",
]


# --------------------------------------------------------------------------- rng helpers
def _resolve_rng(rng, default):
    if rng is None:
        return default
    if isinstance(rng, (bool, np.bool_)):
        raise TypeError("rng must be a random.Random, a numpy Generator/RandomState or an int seed")
    if isinstance(rng, (int, np.integer)):
        return random.Random(int(rng))
    return rng


def _is_numpy_rng(rng):
    return isinstance(rng, (np.random.Generator, np.random.RandomState)) or rng is np.random


def _uniform(rng, low, high):
    # low + (high - low) * U[0, 1): Python's definition, valid for reversed bounds too.
    if _is_numpy_rng(rng):
        return low + (high - low) * float(rng.random())
    return rng.uniform(low, high)


def _randint(rng, low, high):
    """Integer in [low, high], both ends inclusive (Python's ``randint``)."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(low, high + 1))
    if _is_numpy_rng(rng):
        return int(rng.randint(low, high + 1))
    return rng.randint(low, high)


def _samplers(rng):
    """(uniform, randint) bound to ``rng``: :func:`_uniform` and :func:`_randint` with the
    type dispatch done once."""
    if isinstance(rng, np.random.Generator):
        return (lambda low, high: low + (high - low) * float(rng.random()),
                lambda low, high: int(rng.integers(low, high + 1)))
    if _is_numpy_rng(rng):
        return (lambda low, high: low + (high - low) * float(rng.random()),
                lambda low, high: int(rng.randint(low, high + 1)))
    return rng.uniform, rng.randint


def _popcount(x):
    return bin(x).count("1")


if hasattr(int, "bit_count"):  # Python >= 3.10
    _popcount = int.bit_count  # noqa: F811


def _rows_to_mask(rows, width):
    """int8 ``[H, W]`` from one int per row (bit j = column j)."""
    if width <= 63:
        bits = np.array(rows, dtype=np.int64)[:, None] >> np.arange(width, dtype=np.int64)
        return (bits & 1).astype(np.int8)
    return np.array([[(r >> j) & 1 for j in range(width)] for r in rows], dtype=np.int8).reshape(
        len(rows), width)


def _random_array(rng, n):
    if _is_numpy_rng(rng):
        return np.asarray(rng.random(n), dtype=np.float64)
    return np.array([rng.random() for _ in range(n)], dtype=np.float64)


def _choose(rng, population, k):
    """``k`` distinct items of the 1-D array ``population``, in random order."""
    population = np.asarray(population)
    if _is_numpy_rng(rng):
        return population[rng.permutation(len(population))[:k]]
    return population[rng.sample(range(len(population)), k)]


def _grid(input_size):
    if isinstance(input_size, (int, np.integer)):
        return int(input_size), int(input_size)
    height, width = (int(v) for v in input_size)
    if height < 1 or width < 1:
        raise ValueError(f"mask grid must be at least 1x1, got {input_size}")
    return height, width


# ------------------------------------------------------------------------ random masks
class RandomMaskGenerator:
    """Exactly ``int(mask_ratio * N)`` (or ``num_masking_patches``) masked patches,
    positions uniformly at random."""

    def __init__(self, input_size, mask_ratio=None, num_masking_patches=None, rng=None):
        self.height, self.width = _grid(input_size)
        self.num_patches = self.height * self.width
        if (mask_ratio is None) == (num_masking_patches is None):
            raise ValueError("give exactly one of mask_ratio and num_masking_patches")
        if num_masking_patches is None:
            if not 0.0 <= mask_ratio <= 1.0:
                raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
            num_masking_patches = int(mask_ratio * self.num_patches)
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(
                f"num_masking_patches must be in [0, {self.num_patches}], got {num_masking_patches}")
        self.num_masking_patches = int(num_masking_patches)
        self.rng = _resolve_rng(rng, None)

    def __repr__(self):
        return (f"RandomMaskGenerator({self.height}x{self.width}, "
                f"{self.num_masking_patches} of {self.num_patches} masked)")

    def __call__(self, rng=None):
        rng = _resolve_rng(rng, np.random if self.rng is None else self.rng)
        flat = np.zeros(self.num_patches, dtype=np.int8)
        flat[_choose(rng, np.arange(self.num_patches), self.num_masking_patches)] = 1
        return flat.reshape(self.height, self.width)


# ------------------------------------------------------------------------- block masks
class BlockMaskGenerator:
    """BEiT/CAE block-wise masking with an exact masked count.

    One block attempt (given ``max_new``, the most cells this block may add):
    area ~ U(min_num_patches, max_new) (Python's uniform, so reversed bounds are fine),
    aspect = exp(U(log min_aspect, log max_aspect)), h = round(sqrt(area * aspect)),
    w = round(sqrt(area / aspect)) (round half to even); if h < H and w < W (strict) a
    top-left corner is drawn uniformly (inclusive bounds) and the rectangle is accepted
    when it adds between 1 and ``max_new`` new cells. A block makes up to
    ``max_attempts`` attempts (10 in BEiT/CAE; ``None`` = retry until it fits, BootMAE).
    Blocks are added, each limited to min(remaining, max_num_patches), until exactly
    ``num_masking_patches`` cells are masked (CAE's driver).

    Guarantee against endless loops: if ``max_failed_attempts`` consecutive attempts
    (over any number of blocks) add nothing, or no rectangle can ever fit (a grid with a
    side of 1), the remaining cells are chosen uniformly at random among the unmasked
    ones. With the recipe settings the default budget of 1000 is never reached (the
    official runs need at most a few dozen), so the distribution is unchanged; the
    fallback only decides pathological settings. ``draw`` reports how many cells it
    filled (``random_fill``).
    """

    def __init__(self, input_size, num_masking_patches, min_num_patches=16, max_num_patches=None,
                 min_aspect=0.3, max_aspect=None, max_attempts=10, rng=None,
                 max_failed_attempts=1000):
        self.height, self.width = _grid(input_size)
        self.num_patches = self.height * self.width
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(
                f"num_masking_patches must be in [0, {self.num_patches}] for a "
                f"{self.height}x{self.width} grid, got {num_masking_patches}")
        self.num_masking_patches = int(num_masking_patches)
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        if self.num_masking_patches > 0 and self.max_num_patches < 1:
            raise ValueError(f"max_num_patches must be at least 1, got {max_num_patches}")
        if min_aspect <= 0:
            raise ValueError(f"min_aspect must be positive, got {min_aspect}")
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 or None, got {max_attempts}")
        self.max_attempts = max_attempts
        self.max_failed_attempts = int(max_failed_attempts)
        self.rng = _resolve_rng(rng, None)

    def __repr__(self):
        attempts = "until success" if self.max_attempts is None else self.max_attempts
        return (f"BlockMaskGenerator({self.height}x{self.width}, {self.num_masking_patches} masked, "
                f"block {self.min_num_patches}..{self.max_num_patches}, aspect "
                f"{math.exp(self.log_aspect_ratio[0]):.3f}..{math.exp(self.log_aspect_ratio[1]):.3f}, "
                f"attempts per block: {attempts})")

    def get_shape(self):
        return self.height, self.width

    def __call__(self, rng=None):
        return self.draw(rng)[0]

    def draw(self, rng=None):
        """One mask and a dict of what it took: ``blocks`` (accepted rectangles),
        ``calls`` (blocks tried), ``attempts`` and ``random_fill`` (cells set by the
        fallback, normally 0)."""
        rng = _resolve_rng(rng, random if self.rng is None else self.rng)
        uniform, randint = _samplers(rng)
        rows = [0] * self.height  # the mask, one bit per cell (bit j = column j)
        info = {"blocks": 0, "calls": 0, "attempts": 0, "random_fill": 0}
        count = 0
        failed = 0  # consecutive attempts that added nothing
        can_fit = self.height > 1 and self.width > 1
        while count < self.num_masking_patches:
            budget = self.max_failed_attempts - failed
            if not can_fit or budget <= 0:
                mask = _rows_to_mask(rows, self.width)
                info["random_fill"] = self._fill_at_random(mask, self.num_masking_patches - count, rng)
                return mask, info
            if self.max_attempts is not None:
                budget = min(budget, self.max_attempts)
            max_new = min(self.num_masking_patches - count, self.max_num_patches)
            delta, used = self._place_block(rows, max_new, budget, uniform, randint)
            info["calls"] += 1
            info["attempts"] += used
            if delta > 0:
                info["blocks"] += 1
                count += delta
                failed = 0
            else:
                failed += used
        return _rows_to_mask(rows, self.width), info

    def _place_block(self, rows, max_new, budget, uniform, randint):
        """Try up to ``budget`` rectangles; mark the first that adds 1..max_new cells.
        Returns (cells added, attempts used). ``rows``: the mask as one int per row."""
        height, width, low = self.height, self.width, self.min_num_patches
        log_low, log_high = self.log_aspect_ratio
        for attempt in range(1, budget + 1):
            target_area = uniform(low, max_new)
            aspect_ratio = math.exp(uniform(log_low, log_high))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = randint(0, height - h)
                left = randint(0, width - w)
                bits = ((1 << w) - 1) << left
                new = h * w
                for i in range(top, top + h):
                    new -= _popcount(rows[i] & bits)
                if 0 < new <= max_new:
                    for i in range(top, top + h):
                        rows[i] |= bits
                    return new, attempt
        return 0, budget

    @staticmethod
    def _fill_at_random(mask, k, rng):
        flat = mask.reshape(-1)  # a view: writes go to ``mask``
        free = np.flatnonzero(flat == 0)
        flat[_choose(rng, free, k)] = 1
        return int(k)


def bootmae_mask_generator(input_size=14, num_masking_patches=120, min_num_patches=16,
                           max_num_patches=60, min_aspect=0.3, max_aspect=None, rng=None):
    """BootMAE's block generator: blocks of at most 60 patches, 120 in total, every block
    retried until it fits (exact count, like CAE's)."""
    return BlockMaskGenerator(input_size, num_masking_patches, min_num_patches=min_num_patches,
                              max_num_patches=max_num_patches, min_aspect=min_aspect,
                              max_aspect=max_aspect, max_attempts=None, rng=rng)


# ------------------------------------------------------------------- BootMAE shuffle
def bootmae_shuffle_from_mask(mask, mask_num, rng=None, roll=None, max_roll=3):
    """BootMAE's ``mask_to_index``: turn block masks into a shuffle order.

    mask: ``[H, W]`` or ``[B, H, W]`` (1 = block-masked). Each patch scores
    ``(1 - mask) + u`` with u ~ U[0, 1); ``idx_shuffle = argsort(-score)`` puts every
    visible patch first and every block-masked patch last, each group in random order.
    The order is then rolled right by ``roll`` (drawn from [0, max_roll] inclusive, one
    value for the whole batch, unless given), moving ``roll`` masked patches to the front.
    The first ``N - mask_num`` indices are kept by the encoder.

    Returns ``(idx_shuffle, loss_mask)``: int64 ``[N]`` / ``[B, N]`` and int8 with the shape
    of ``mask``, 1 = dropped (exactly ``mask_num`` per sample), in raster order.
    """
    mask = np.asarray(mask)
    if mask.ndim not in (2, 3):
        raise ValueError(f"mask must be [H, W] or [B, H, W], got shape {mask.shape}")
    single = mask.ndim == 2
    batch = mask[None] if single else mask
    num_batch, num_patches = batch.shape[0], batch.shape[1] * batch.shape[2]
    if not 0 <= mask_num <= num_patches:
        raise ValueError(f"mask_num must be in [0, {num_patches}], got {mask_num}")
    rng = _resolve_rng(rng, np.random)

    flat = batch.reshape(num_batch, num_patches).astype(np.float64)
    noise = _random_array(rng, num_batch * num_patches).reshape(num_batch, num_patches)
    score = (1.0 - flat) + noise                                    # [B, N]
    idx_shuffle = np.argsort(-score, axis=1, kind="stable")         # visible first
    if roll is None:
        roll = _randint(rng, 0, max_roll)
    idx_shuffle = np.roll(idx_shuffle, int(roll), axis=1).astype(np.int64)

    keep = num_patches - mask_num
    loss_mask = np.ones((num_batch, num_patches), dtype=np.int8)
    np.put_along_axis(loss_mask, idx_shuffle[:, :keep], 0, axis=1)
    loss_mask = loss_mask.reshape(batch.shape)
    if single:
        return idx_shuffle[0], loss_mask[0]
    return idx_shuffle, loss_mask
