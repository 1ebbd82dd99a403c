"""Sliding-window inference (mmseg's ``slide`` mode of the official test configs) and colour
masks.

The resized image is covered by crops of ``crop`` pixels every ``stride`` pixels (the last
crop of a row or column is shifted back to end at the border); each crop's logits (main head)
are added where it lies and the sum divided by the number of crops covering each pixel. A crop
of a side shorter than ``crop`` is padded with zeros (the encoder's tables are made for the
crop) and the padding's logits are dropped. The logits are then resized (bilinear) to the
original image size and the class is their argmax.
"""
import numpy as np
import paddle
import paddle.nn.functional as F
from PIL import Image


def window_starts(length, crop, stride):
    """Start offsets of the windows along one side (mmseg's grid rule)."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride, length - crop), 0) for i in range(count)]


@paddle.no_grad()
def slide_logits(model, image, num_classes, crop, stride, precision=None):
    """``image`` [3, H, W] (normalised) -> logits [classes, H, W] (float32)."""
    _, h, w = image.shape
    x = paddle.to_tensor(image[None]) if isinstance(image, np.ndarray) else image.unsqueeze(0)
    total = paddle.zeros([1, num_classes, h, w], dtype="float32")
    count = paddle.zeros([1, 1, h, w], dtype="float32")
    for top in window_starts(h, crop, stride):
        for left in window_starts(w, crop, stride):
            bottom, right = min(top + crop, h), min(left + crop, w)
            window = x[:, :, top:bottom, left:right]
            ph, pw = crop - (bottom - top), crop - (right - left)
            if ph or pw:
                window = F.pad(window, [0, pw, 0, ph], value=0.0, data_format="NCHW")
            if precision is not None:
                with precision.autocast():
                    logits = model(window)[0]
            else:
                logits = model(window)[0]
            logits = logits.astype("float32")[:, :, :bottom - top, :right - left]
            total[:, :, top:bottom, left:right] += logits
            count[:, :, top:bottom, left:right] += 1
    return (total / count)[0]


def predict_mask(model, image, num_classes, crop, stride, out_hw, precision=None):
    """Class ids [H, W] (int64) at ``out_hw`` for a normalised, resized ``image`` [3, h, w]."""
    logits = slide_logits(model, image, num_classes, crop, stride, precision)
    if tuple(logits.shape[1:]) != tuple(out_hw):
        logits = F.interpolate(logits.unsqueeze(0), size=list(out_hw), mode="bilinear",
                               align_corners=False)[0]
    return logits.argmax(axis=0).numpy().astype(np.int64)


def palette(num_classes, seed=0):
    """A fixed colour per class (index = class id); class ids of the demo are readable:
    background grey, then saturated colours."""
    rng = np.random.RandomState(seed)
    colours = rng.randint(40, 256, size=(max(num_classes, 1), 3)).astype(np.uint8)
    base = np.array([[128, 128, 128], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                     [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60],
                     [0, 128, 128]], np.uint8)
    k = min(len(base), num_classes)
    colours[:k] = base[:k]
    return colours


def colour_mask(mask, num_classes, ignore_index=255):
    """[H, W] class ids -> [H, W, 3] uint8 (ignored pixels black)."""
    colours = palette(num_classes)
    out = np.zeros(mask.shape + (3,), np.uint8)
    valid = (mask >= 0) & (mask < num_classes) & (mask != ignore_index)
    out[valid] = colours[mask[valid]]
    return out


def save_colour_mask(mask, num_classes, path):
    """Write the colour mask PNG atomically (temporary file, then rename)."""
    import os

    tmp = f"{path}.tmp"
    Image.fromarray(colour_mask(mask, num_classes)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


__all__ = ["colour_mask", "palette", "predict_mask", "save_colour_mask", "slide_logits",
           "window_starts"]
