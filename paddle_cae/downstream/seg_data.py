"""Segmentation data: ADE20K-style folders, the demo set made from the bundled digits, and the
official (mmseg) training and evaluation transforms of the CAE / BootMAE / BEiT recipes.

Folder layout (ADE20K's ``ADEChallengeData2016``)::

    DATA_PATH/images/training/*.jpg        DATA_PATH/annotations/training/*.png
    DATA_PATH/images/validation/*.jpg      DATA_PATH/annotations/validation/*.png

An image and its label share the file stem. Label values: 0 = unlabelled (ignored), 1..N = the
N classes; 255 is ignored too. As mmseg's ``reduce_zero_label`` does, the network sees class
``v - 1`` and the ignore value 255. Before anything is written, every split is checked: an image
without its label (or the reverse), a label of another size than its image, a label value above
``--num_classes`` that is not 0 or 255, or an empty split stop the run with one line naming the
file.

Training transform (mmseg's pipeline of the official configs): resize to ``img_scale`` times a
ratio drawn from ``ratio_range`` keeping the aspect (bilinear image, nearest label), random crop
of ``crop_size`` redrawn up to 10 times while one class covers more than ``cat_max_ratio`` of
it, horizontal flip (p 0.5), photometric distortion (brightness, contrast, saturation, hue,
each with p 0.5), normalisation, padding to the crop (image 0, label 255). Evaluation: resize to
``img_scale`` keeping the aspect; the prediction is resized back to the original label.
"""
import logging
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..data.transforms import numpy_rng

logger = logging.getLogger("paddle_cae")

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
SPLITS = {"train": "training", "val": "validation"}


# ------------------------------------------------------------------------------ folders
def split_pairs(root, split):
    """Sorted [(image path, label path)] of ``split`` ('train' / 'val'); ValueError naming the
    file for an image without label, a label without image, or an empty split."""
    folder = SPLITS[split]
    img_dir = Path(root) / "images" / folder
    ann_dir = Path(root) / "annotations" / folder
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise FileNotFoundError(
                f"{d}: folder not found; --data_path must hold images/{{training,validation}}/*.jpg "
                "and annotations/{training,validation}/*.png (ADE20K layout)")
    images = {p.stem: p for p in sorted(img_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    labels = {p.stem: p for p in sorted(ann_dir.iterdir()) if p.suffix.lower() == ".png"}
    for stem, path in images.items():
        if stem not in labels:
            raise ValueError(f"{path}: no label {ann_dir / (stem + '.png')} for this image")
    for stem, path in labels.items():
        if stem not in images:
            raise ValueError(f"{path}: label without an image of the same name in {img_dir}")
    if not images:
        raise ValueError(f"{img_dir}: empty split (no {'/'.join(IMAGE_SUFFIXES)} images)")
    return [(str(images[s]), str(labels[s])) for s in sorted(images)]


def read_label(path):
    """Label PNG -> uint8 [H, W] (palette indices or grey values, as stored)."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I;16", "I"):
            raise ValueError(f"{path}: label must be a single-channel PNG (mode L or P), got mode "
                             f"{im.mode}")
        arr = np.asarray(im)
    if arr.dtype != np.uint8:
        if arr.max(initial=0) > 255:
            raise ValueError(f"{path}: label value {int(arr.max())} does not fit 0..255")
        arr = arr.astype(np.uint8)
    return arr


def read_image(path):
    """RGB uint8 [H, W, 3]; ValueError naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError) as err:
        raise ValueError(f"{path}: cannot read the image ({err})") from None


def image_size(path):
    try:
        with Image.open(path) as im:
            return im.size  # (W, H) from the header
    except (OSError, SyntaxError) as err:
        raise ValueError(f"{path}: cannot read the image ({err})") from None


def check_label(label, path, num_classes, image_hw=None):
    """ValueError naming ``path`` for values above ``num_classes`` (other than 255) or a size
    other than the image's."""
    if image_hw is not None and tuple(label.shape[:2]) != tuple(image_hw):
        raise ValueError(f"{path}: label is {label.shape[1]}x{label.shape[0]}, its image "
                         f"{image_hw[1]}x{image_hw[0]}")
    bad = (label > num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        raise ValueError(f"{path}: label value {int(label[bad].max())} is above --num_classes "
                         f"{num_classes} (values: 0 = ignored, 1..{num_classes} = classes, 255 = ignored)")


def reduce_zero_label(label):
    """File values -> training targets: 0 -> 255 (ignored), v -> v - 1, 255 stays ignored."""
    out = label.astype(np.int64) - 1
    out[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
    return out


class SegmentationFolder:
    """One split of an ADE20K-style folder; items are ``(image RGB uint8, label uint8)``
    before the transform, dicts of arrays after it."""

    def __init__(self, root, split, num_classes, transform=None, check=True):
        self.root = str(root)
        self.split = split
        self.num_classes = int(num_classes)
        self.pairs = split_pairs(root, split)
        self.transform = transform
        if check:
            self.check()

    def check(self):
        """Every label against its image (size) and ``num_classes`` (values), before the run
        writes anything."""
        for img_path, lbl_path in self.pairs:
            w, h = image_size(img_path)
            check_label(read_label(lbl_path), lbl_path, self.num_classes, (h, w))

    def __len__(self):
        return len(self.pairs)

    def name(self, index):
        return Path(self.pairs[index][0]).stem

    def raw(self, index):
        img_path, lbl_path = self.pairs[index]
        image, label = read_image(img_path), read_label(lbl_path)
        check_label(label, lbl_path, self.num_classes, image.shape[:2])
        return image, label

    def __getitem__(self, index):
        image, label = self.raw(index)
        return self.transform(image, label) if self.transform else (image, label)


# --------------------------------------------------------------------------- demo set
DEMO_BACKGROUND = 1          # label of the canvas
DEMO_DIGIT_OFFSET = 2        # digit d has label d + 2
DEMO_NUM_CLASSES = 11
DEMO_CANVAS = 64
DEMO_SIZES = {"train": 320, "val": 64}


def _digit_files(digits_root, split):
    root = Path(digits_root) / split
    files = []
    for cls in sorted(os.listdir(root)):
        if cls.isdigit():
            files += [(int(cls), str(p)) for p in sorted((root / cls).glob("*.png"))]
    if not files:
        raise ValueError(f"{root}: no digit images (expected {root}/<0-9>/*.png)")
    return files


def make_demo_canvas(rng, digits, canvas=DEMO_CANVAS):
    """One demo picture: 1 to 3 digits (scaled to 18..34 px) pasted on a light, noisy canvas.
    Label: 1 = canvas, d + 2 = digit d where the stroke is dark (< 128), 0 (ignored) on the
    stroke's soft edge (128..199)."""
    base = rng.randint(170, 256, size=3)
    image = np.clip(base[None, None, :] + rng.randint(-12, 13, size=(canvas, canvas, 3)), 0, 255)
    image = image.astype(np.uint8)
    label = np.full((canvas, canvas), DEMO_BACKGROUND, np.uint8)
    for _ in range(rng.randint(1, 4)):
        cls, path = digits[rng.randint(len(digits))]
        size = int(rng.randint(18, 35))
        grey = np.asarray(Image.open(path).convert("L").resize((size, size), Image.BILINEAR))
        y, x = rng.randint(0, canvas - size + 1), rng.randint(0, canvas - size + 1)
        patch = image[y:y + size, x:x + size]
        ink = rng.randint(0, 90, size=3)  # the stroke's colour
        dark = 1.0 - grey.astype(np.float32) / 255.0  # 1 on the stroke
        blended = patch * (1 - dark[..., None]) + ink[None, None, :] * dark[..., None]
        image[y:y + size, x:x + size] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
        region = label[y:y + size, x:x + size]
        region[grey < 200] = 0
        region[grey < 128] = cls + DEMO_DIGIT_OFFSET
    return image, label


def demo_samples(split, digits_root=None, seed=0, count=None):
    """[(image, label)] of the demo split, the same on every machine (fixed seed per split)."""
    from ..data.datasets import default_data_path

    digits = _digit_files(digits_root or default_data_path(), split)
    rng = np.random.RandomState(seed + (0 if split == "train" else 1))
    return [make_demo_canvas(rng, digits) for _ in range(count or DEMO_SIZES[split])]


class DemoSegmentation:
    """The demo split, in memory (nothing written); same interface as SegmentationFolder."""

    def __init__(self, split, transform=None, digits_root=None, count=None):
        self.split = split
        self.root = f"demo digits ({split})"
        self.num_classes = DEMO_NUM_CLASSES
        self.samples = demo_samples(split, digits_root, count=count)
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def name(self, index):
        return f"demo_{self.split}_{index:04d}"

    def raw(self, index):
        return self.samples[index]

    def __getitem__(self, index):
        image, label = self.raw(index)
        return self.transform(image, label) if self.transform else (image, label)


def write_demo_dataset(out_dir, digits_root=None, counts=None):
    """Write the demo set in the ADE20K layout (``python -m paddle_cae.downstream.seg_data OUT``)."""
    counts = counts or DEMO_SIZES
    for split, folder in SPLITS.items():
        img_dir = Path(out_dir) / "images" / folder
        ann_dir = Path(out_dir) / "annotations" / folder
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(demo_samples(split, digits_root, count=counts[split])):
            Image.fromarray(image).save(img_dir / f"demo_{i:04d}.jpg", quality=95)
            Image.fromarray(label).save(ann_dir / f"demo_{i:04d}.png")
    return str(out_dir)


# --------------------------------------------------------------------------- transforms
def rescale_size(w, h, scale):
    """mmcv ``imrescale``: the largest size that fits (long, short) = ``scale`` keeping the aspect."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def resize_pair(image, label, scale):
    h, w = image.shape[:2]
    nw, nh = rescale_size(w, h, scale)
    image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    if label is not None:
        label = cv2.resize(label, (nw, nh), interpolation=cv2.INTER_NEAREST)
    return image, label


def _crop_box(rng, h, w, crop):
    top = rng.randint(0, max(h - crop, 0) + 1)
    left = rng.randint(0, max(w - crop, 0) + 1)
    return top, min(top + crop, h), left, min(left + crop, w)


def random_crop(rng, image, target, crop, cat_max_ratio):
    box = _crop_box(rng, *target.shape, crop)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            t = target[box[0]:box[1], box[2]:box[3]]
            _, counts = np.unique(t[t != IGNORE_INDEX], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = _crop_box(rng, *target.shape, crop)
    y0, y1, x0, x1 = box
    return image[y0:y1, x0:x1], target[y0:y1, x0:x1]


def _convert(image, alpha=1.0, beta=0.0):
    return np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(rng, image, brightness_delta=32, contrast=(0.5, 1.5),
                           saturation=(0.5, 1.5), hue_delta=18):
    """mmseg's PhotoMetricDistortion (on RGB instead of BGR: the same hue and saturation)."""
    if rng.randint(2):
        image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.randint(2)
    if contrast_first and rng.randint(2):
        image = _convert(image, alpha=rng.uniform(*contrast))
    if rng.randint(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.randint(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(int) + rng.randint(-hue_delta, hue_delta)) % 180
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first and rng.randint(2):
        image = _convert(image, alpha=rng.uniform(*contrast))
    return image


def normalize(image, mean, std):
    """uint8 RGB [H, W, 3] -> float32 [3, H, W] with mean/std given on the 0..1 scale."""
    x = image.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


class TrainTransform:
    def __init__(self, crop_size, img_scale, ratio_range, cat_max_ratio, mean, std):
        self.crop = int(crop_size)
        self.img_scale = tuple(img_scale)
        self.ratio_range = tuple(ratio_range)
        self.cat_max_ratio = float(cat_max_ratio)
        self.mean, self.std = mean, std

    def __call__(self, image, label):
        rng = numpy_rng()
        ratio = rng.uniform(*self.ratio_range)
        scale = (int(self.img_scale[0] * ratio), int(self.img_scale[1] * ratio))
        image, label = resize_pair(image, label, scale)
        target = reduce_zero_label(label)
        image, target = random_crop(rng, image, target, self.crop, self.cat_max_ratio)
        if rng.rand() < 0.5:
            image, target = image[:, ::-1], target[:, ::-1]
        image = photometric_distortion(rng, np.ascontiguousarray(image))
        x = normalize(image, self.mean, self.std)
        h, w = target.shape
        images = np.zeros((3, self.crop, self.crop), np.float32)
        labels = np.full((self.crop, self.crop), IGNORE_INDEX, np.int64)
        images[:, :h, :w] = x
        labels[:h, :w] = target
        return {"images": images, "labels": labels}


class EvalTransform:
    """Resize to ``img_scale`` keeping the aspect and normalise; the label stays at its size."""

    def __init__(self, img_scale, mean, std):
        self.img_scale = tuple(img_scale)
        self.mean, self.std = mean, std

    def image(self, image):
        resized, _ = resize_pair(image, None, self.img_scale)
        return normalize(resized, self.mean, self.std)

    def __call__(self, image, label):
        return {"images": self.image(image), "labels": reduce_zero_label(label)}


if __name__ == "__main__":  # python -m paddle_cae.downstream.seg_data OUT_DIR
    import sys

    print(write_demo_dataset(sys.argv[1] if len(sys.argv) > 1 else "demo_segmentation"))
