"""Write the bundled demo dataset: scikit-learn's handwritten digits as ImageFolder PNGs.

    pip install scikit-learn   # only needed to regenerate; not a dependency of paddle-cae
    python tools/make_demo_digits.py [--out demo/digits] [--size 32]

The 1,797 digits are 8x8 grey images with values 0..16 (the UCI "Optical Recognition of
Handwritten Digits" test set, shipped with scikit-learn). Each one is scaled to 0..255,
inverted to dark ink on a white background, upscaled to ``--size`` pixels with NEAREST
interpolation and saved as a 3-channel (RGB) PNG. Nearest keeps the source values exactly
(at 32x32 each source pixel becomes a 4x4 block, so a patch-4 ViT sees one source pixel per
patch and patch 8 a 2x2 group) and compresses to about 250 bytes per image (~0.45 MB in
all; bilinear would need ~2 MB). Training-time crops and resizes interpolate as usual.

The train/val split is fixed: per class, the sample indices are permuted with
``numpy.random.default_rng(0)`` and the first 20% (rounded) go to val, the rest to train.
Files are named after the sample's index in ``load_digits()`` so every image can be traced
back to its source row.
"""
import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SPLIT_SEED = 0
VAL_FRACTION = 0.2


def split_indices(labels, val_fraction=VAL_FRACTION, seed=SPLIT_SEED):
    """Stratified split: returns (train_indices, val_indices), both sorted."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(len(members))]
        n_val = int(round(val_fraction * len(members)))
        val.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    return sorted(train), sorted(val)


def digit_to_image(pixels_8x8, size):
    grey = np.clip(np.asarray(pixels_8x8, np.float64) * (255.0 / 16.0), 0, 255)
    grey = (255.0 - grey).round().astype(np.uint8)  # dark ink on white
    img = Image.fromarray(grey, mode="L").resize((size, size), Image.NEAREST)
    return img.convert("RGB")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "demo" / "digits"))
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args(argv)

    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover
        raise SystemExit("regenerating the demo digits needs scikit-learn: pip install scikit-learn") from err

    digits = load_digits()
    labels = np.asarray(digits.target)
    train, val = split_indices(labels)
    out = Path(args.out)
    for split, indices in (("train", train), ("val", val)):
        split_dir = out / split
        if split_dir.exists():
            shutil.rmtree(split_dir)
        for idx in indices:
            class_dir = split_dir / str(int(labels[idx]))
            class_dir.mkdir(parents=True, exist_ok=True)
            digit_to_image(digits.images[idx], args.size).save(class_dir / f"{idx:04d}.png", optimize=True)
        print(f"{split}: {len(indices)} images -> {split_dir}")


if __name__ == "__main__":
    main()
