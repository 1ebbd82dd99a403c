"""Make a folder of JPEG photographs at ImageNet-like sizes for the data-pipeline benchmark.

The pixels come from the natural photographs that scikit-learn ships inside its wheel
(``sklearn.datasets.load_sample_images``: china.jpg and flower.jpg, 640x427), so nothing is
downloaded when this runs (install the tools-only requirement once:
``pip install -r requirements-bench.txt``). Each output file is a random crop of one of them,
rescaled to a short side of 300-500 px and an aspect ratio of 1-1.6 (landscape or portrait),
randomly mirrored and slightly tinted, and saved at a JPEG quality of 75-95 with 4:2:0 chroma
subsampling, like most ImageNet files. The layout is the ImageNet one::

    OUT/train/<class>/<name>.JPEG      OUT/val/<class>/<name>.JPEG

    python tools/make_photos.py --out /tmp/photos --count 300
"""
import argparse
import os
import random
import sys

import numpy as np
from PIL import Image


def source_photos():
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        sys.exit("tools/make_photos.py needs scikit-learn for its bundled sample photographs: "
                 "pip install -r requirements-bench.txt")
    return [Image.fromarray(np.asarray(a, dtype=np.uint8)) for a in load_sample_images().images]


def target_size(rng):
    """(width, height): short side 300-500, aspect 1-1.6, three in four landscape."""
    short = rng.randint(300, 500)
    long = int(round(short * rng.uniform(1.0, 1.6)))
    return (long, short) if rng.random() < 0.75 else (short, long)


def make_photo(source, rng):
    width, height = target_size(rng)
    src_w, src_h = source.size
    # a crop of the source with the target's aspect ratio, covering 35-100% of the fitting box
    fit = min(src_w / width, src_h / height)
    frac = rng.uniform(0.6, 1.0)
    crop_w, crop_h = width * fit * frac, height * fit * frac
    left, top = rng.uniform(0, src_w - crop_w), rng.uniform(0, src_h - crop_h)
    img = source.resize((width, height), Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    tint = np.array([rng.uniform(0.85, 1.15) for _ in range(3)], np.float32)
    arr = np.clip(np.asarray(img, np.float32) * tint, 0, 255).astype(np.uint8)
    return Image.fromarray(arr), rng.randint(75, 95)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    parser.add_argument("--count", type=int, default=300, help="images in train/ (default 300)")
    parser.add_argument("--val_count", type=int, default=20, help="images in val/ (default 20)")
    parser.add_argument("--classes", type=int, default=10, help="class folders (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.count < 1 or args.classes < 1:
        parser.error("--count and --classes must be >= 1")
    rng = random.Random(args.seed)
    sources = source_photos()
    sizes = []
    for split, count in (("train", args.count), ("val", args.val_count)):
        for i in range(count):
            folder = os.path.join(args.out, split, f"class_{i % args.classes:02d}")
            os.makedirs(folder, exist_ok=True)
            img, quality = make_photo(sources[rng.randrange(len(sources))], rng)
            img.save(os.path.join(folder, f"{split}_{i:05d}.JPEG"), quality=quality, subsampling=2)
            sizes.append(img.size)
    area = np.mean([w * h for w, h in sizes])
    print(f"{len(sizes)} JPEG files in {args.out} (train {args.count}, val {args.val_count}); "
          f"mean size {np.mean([w for w, _ in sizes]):.0f}x{np.mean([h for _, h in sizes]):.0f}, "
          f"mean area {area / 1e3:.0f} kpx")


if __name__ == "__main__":
    main()
