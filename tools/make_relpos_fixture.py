"""Expected results for the relative-position table resampling test (tests/data/relpos_resample.npz).

The official BEiT/CAE fine-tuning code resamples a relative-position bias table with
``scipy.interpolate.interp2d(x, y, z, kind='cubic')`` on a geometric-progression grid. interp2d
was removed from SciPy 1.14; on a rectangular grid it was a thin wrapper of FITPACK's
``regrid_smth`` with kx = ky = 3 and s = 0 evaluated with ``bisplev``, which is exactly what
``RectBivariateSpline(x, y, z, kx=3, ky=3, s=0)`` does, so that is used here.

Run once with a Python that has SciPy (the package itself does not depend on it):

    python3 tools/make_relpos_fixture.py          # writes tests/data/relpos_resample.npz
"""
import os

import numpy as np
from scipy.interpolate import RectBivariateSpline

CASES = [  # (source grid, target grid, heads)
    (3, 5, 2),      # the smallest table FITPACK accepts (5 offsets per axis)
    (7, 14, 3),     # 13 -> 27 offsets
    (8, 12, 2),     # the CAE demo grid to a larger fine-tuning resolution
    (14, 24, 2),    # ViT-B/16 224 px -> 384 px
    (8, 4, 2),      # to a smaller grid
]


def geometric_offsets(src_offsets, dst_offsets):
    """Source offsets spread on a geometric progression whose outermost offset reaches the
    target extent (bisection on the ratio as in the BEiT code)."""
    half_src, half_dst = src_offsets // 2, dst_offsets // 2
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        ratio = (left + right) / 2.0
        if (1.0 - ratio ** half_src) / (1.0 - ratio) > half_dst:
            right = ratio
        else:
            left = ratio
    steps, current = [], 1.0
    for i in range(half_src):
        steps.append(current)
        current += ratio ** (i + 1)
    return np.array([-s for s in reversed(steps)] + [0.0] + steps)


def resample(table, src_grid, dst_grid):
    src, dst = 2 * src_grid - 1, 2 * dst_grid - 1
    x = geometric_offsets(src, dst)
    t = np.arange(-(dst // 2), dst // 2 + 0.1, 1.0)
    out = []
    for h in range(table.shape[1]):
        z = table[:-3, h].reshape(src, src).astype(np.float64)
        spline = RectBivariateSpline(x, x, z, kx=3, ky=3, s=0)
        out.append(spline(t, t).reshape(-1))
    return np.stack(out, axis=1)


def main():
    rng = np.random.RandomState(0)
    arrays = {}
    for n, (src_grid, dst_grid, heads) in enumerate(CASES):
        rows = (2 * src_grid - 1) ** 2 + 3
        table = rng.standard_normal((rows, heads)).astype(np.float32)
        arrays[f"table_{n}"] = table
        arrays[f"grids_{n}"] = np.array([src_grid, dst_grid])
        arrays[f"expected_{n}"] = resample(table, src_grid, dst_grid)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data",
                        "relpos_resample.npz")
    np.savez_compressed(path, **arrays)
    print(f"wrote {os.path.normpath(path)} ({len(CASES)} cases)")


if __name__ == "__main__":
    main()
