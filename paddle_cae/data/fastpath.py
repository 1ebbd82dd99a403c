"""Loader-side fast path of the pretraining pipelines: uint8 hand-over, optional reduced decoding.

The reference pipelines (:mod:`.transforms`: PIL image in, normalised float32 out) stay the
definition. For an image folder, :func:`fast_twin` builds a twin of a pretraining transform
that takes the image *file* and

* draws every random number the reference draws, in the same order from the same per-sample
  generators (crop box, flip, masks, MAE's noise): the crop box only needs the image size,
  which the JPEG header gives before any pixel is decoded;
* crops, resizes and mirrors with the exact C resampler (:mod:`.resample`: Pillow's pixels
  without the crop copy, the mirrored image or the HWC -> CHW copy), PIL where it is not
  available;
* hands the pixel arrays over as uint8 ``[3, H, W]`` (4x less to collate, copy and send
  through shared memory than float32), each with a small description of the float conversion
  the reference applies (key suffixes :data:`NORM_SUFFIX`, :data:`MAP_SUFFIX`);
  :func:`to_model_floats` (called by the training step, on the device) turns them into the
  reference's float32 tensors with the same operations in the same order;
* with ``fast_decode``, decodes a JPEG at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling,
  PIL ``Image.draft``) when the crop box is at least that many times larger than the output
  in both directions (``True``), so the crop is still downsampled after the reduced decode;
  a ratio r < 1 also allows reduced crops down to r times the output, enlarged again by the
  resize (faster, softer images). The crop box and all other draws are unchanged; the pixels
  differ from a full decode followed by the bicubic downsampling, hence an option (off by
  default).

Without ``fast_decode`` the twin's samples equal the reference's: the same images after
conversion (bit for bit on CPU, see tests), the same masks.
"""
import copy

import numpy as np
from PIL import Image

from ..fast import resample
from .transforms import (BootMAEPretrainTransform, CAEPretrainTransform, MAEPretrainTransform, MapPixels,
                         Normalize, RandomHorizontalFlip, RandomResizedCrop, RandomResizedCropTwoViews,
                         ToTensor, _resolve_interpolation)

NORM_SUFFIX = "_u8norm"  # [2, 3] float32 rows (mean, std): float = (u8 / 255 - mean) / std
MAP_SUFFIX = "_u8map"    # [2] float32 (a, b): float = a * (u8 / 255) + b  (DALL-E map_pixels: 1 - 2 eps, eps)
HANDOVERS = ("uint8", "float32")


class UnreadableImage(Exception):
    """The file could not be decoded (the dataset replaces the sample, as for a failed open)."""


def decode_ratio(fast_decode):
    """``fast_decode`` as the smallest size, relative to the output, a crop may have after a
    reduced decode: False/None/0 -> 0 (off); True -> 1.0 (the crop stays downsampled); a
    number in (0, 1] as it is (below 1 the reduced crop is enlarged again: faster, softer)."""
    if fast_decode is None or fast_decode is False:
        return 0.0
    ratio = 1.0 if fast_decode is True else float(fast_decode)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"fast_decode must be true/false or a ratio in (0, 1], got {fast_decode!r}")
    return ratio


def draft_scale(box_w, box_h, out_w, out_h, ratio=1.0):
    """The largest JPEG DCT scale 1/s (s in 2, 4, 8) that keeps a ``box_w`` x ``box_h`` crop
    at least ``ratio`` times the ``out_w`` x ``out_h`` output in both directions; 1 when none
    does or ``ratio`` is 0 (off)."""
    scale = 1
    if ratio > 0:
        for s in (2, 4, 8):
            if box_w >= s * ratio * out_w and box_h >= s * ratio * out_h:
                scale = s
    return scale


class ImageSource:
    """An image file opened for its header only: ``size`` is known, no pixel is decoded yet.
    ``flipped`` is set by a pipeline that mirrors the whole image before cropping (CAE)."""

    def __init__(self, path):
        self.path = path
        self.img = Image.open(path)
        self.size = self.img.size
        self.flipped = False

    def decode(self, crop_w, crop_h, out_w, out_h, ratio=0.0, apply_flip=True):
        """(RGB image, scale): the pixels, decoded at 1/scale of the file's size. Reduced
        decoding only for JPEG with ``ratio`` > 0 (:func:`decode_ratio`), when
        :func:`draft_scale` allows it for a ``crop_w`` x ``crop_h`` crop resized to
        ``out_w`` x ``out_h``. ``flipped`` is applied unless ``apply_flip`` is False (the
        caller mirrors while resampling)."""
        img = self.img
        scale = 1.0
        try:
            if ratio > 0 and img.format == "JPEG":
                s = draft_scale(crop_w, crop_h, out_w, out_h, ratio)
                drafted = img.draft(None, (self.size[0] // s, self.size[1] // s)) if s > 1 else None
                if drafted is not None:  # (mode, the full image's box in the reduced one)
                    scale = self.size[0] / drafted[1][2]
            img.load()
            if img.mode != "RGB":
                img = img.convert("RGB")
        except Exception as err:  # noqa: BLE001  any decoder error means "unreadable"
            self.img.close()
            raise UnreadableImage(f"{type(err).__name__}: {err}") from err
        if self.flipped and apply_flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return img, scale


def _views(source, params, outputs, ratio, flip_out=False):
    """The crop ``params`` (top, left, h, w; drawn on the (flipped) image) resized to each
    output (size (h, w), filter), mirrored with ``flip_out``, as uint8 ``[3, h, w]`` arrays.
    Full decode: crop, then resize, as the reference does (a box given to ``resize`` would
    let the filter read pixels outside it). Reduced decode: the box in the reduced image's
    coordinates, resized directly. The exact C resampler (:mod:`.resample`, mirrors
    included) where it is available, else PIL."""
    top, left, h, w = params
    out_h, out_w = outputs[0][0]
    fast = resample.library() is not None
    img, scale = source.decode(w, h, out_w, out_h, ratio, apply_flip=not fast)
    mirror = source.flipped and fast  # still to be mirrored
    if scale == 1.0:
        box, span = (left, top, left + w, top + h), None
    else:
        # pixel j of a 1/s decode covers pixels [j s, (j + 1) s) of the file; a mirrored
        # decode is shifted by its rounded-up width
        shift = img.size[0] - source.size[0] / scale if source.flipped else 0.0
        box, span = None, (left / scale + shift, top / scale, (left + w) / scale + shift, (top + h) / scale)
    views = []
    for (oh, ow), f in outputs:
        arr = None
        if fast:
            arr = (resample.crop_resize(img, box, (ow, oh), f, mirror, flip_out) if span is None
                   else resample.resize_box(img, span, (ow, oh), f, mirror, flip_out))
        if arr is None:
            src = img.transpose(Image.FLIP_LEFT_RIGHT) if mirror else img
            view = (src.crop(box).resize((ow, oh), f) if span is None
                    else src.resize((ow, oh), f, box=span))
            arr = u8_chw(view.transpose(Image.FLIP_LEFT_RIGHT) if flip_out else view)
        views.append(arr)
    return views


def u8_chw(img):
    """PIL RGB image -> uint8 ``[3, H, W]`` (one copy); an array is returned as it is."""
    if isinstance(img, np.ndarray):
        return img
    return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))


class _CropFlipU8:
    """MAE/BootMAE's RandomResizedCrop + RandomHorizontalFlip on an :class:`ImageSource`,
    drawing in the reference's order: crop box, filter (for 'random'), flip."""

    def __init__(self, crop, flip, ratio):
        self.crop, self.flip, self.ratio = crop, flip, ratio

    def __call__(self, source):
        crop = self.crop
        params = crop.get_params(source, crop.scale, crop.ratio)
        outputs = [(crop.size, _resolve_interpolation(crop.interpolation))]
        flip = self.flip.draw()
        view, = _views(source, params, outputs, self.ratio, flip_out=flip)
        return view

    def __repr__(self):
        return f"{self.crop!r} + {self.flip!r} -> uint8 (fast_decode ratio {self.ratio})"


class _FlipLater:
    """CAE flips the whole image before cropping: draw now, mirror when decoding."""

    def __init__(self, flip):
        self.flip = flip

    def __call__(self, source):
        source.flipped = self.flip.draw()
        return source


class _TwoViewsU8:
    """CAE's one crop box resized twice (encoder view, tokenizer view)."""

    def __init__(self, crop, ratio):
        self.crop, self.ratio = crop, ratio

    def __call__(self, source):
        crop = self.crop
        params = crop.get_params(source, crop.scale, crop.ratio)
        outputs = [(crop.size, _resolve_interpolation(crop.interpolation)),
                   (crop.second_size, _resolve_interpolation(crop.second_interpolation))]
        return tuple(_views(source, params, outputs, self.ratio))

    def __repr__(self):
        return f"{self.crop!r} -> uint8 (fast_decode ratio {self.ratio})"


def _is_compose_of(compose, kinds):
    steps = getattr(compose, "transforms", None)
    return steps is not None and len(steps) == len(kinds) and \
        all(type(s) is k for s, k in zip(steps, kinds))


def _norm_spec(normalize):
    return np.stack([normalize.mean.ravel(), normalize.std.ravel()]).astype(np.float32)


def _map_spec(map_pixels):
    return np.array([1 - 2 * map_pixels.eps, map_pixels.eps], np.float32)


class FastTwin:
    """Callable on an :class:`ImageSource`: the pretraining sample with uint8 images and their
    conversion specs. ``twin`` is a shallow copy of the reference transform with its image
    stages swapped, so its own ``__call__`` (mask and order logic included) runs unchanged."""

    def __init__(self, twin, specs, fast_decode):
        self.twin = twin
        self.specs = specs
        self.fast_decode = fast_decode

    def __call__(self, source):
        sample = self.twin(source)
        sample.update(self.specs)
        return sample

    def __repr__(self):
        return f"FastTwin(uint8 hand-over, fast_decode={self.fast_decode}, of {self.twin!r})"


def fast_twin(transform, fast_decode=False):
    """A :class:`FastTwin` of a pretraining transform, or None when ``transform`` is not one of
    the pipelines this module knows in its standard composition (it then runs as it is).
    ``fast_decode``: see :func:`decode_ratio`."""
    ratio = decode_ratio(fast_decode)
    if type(transform) in (MAEPretrainTransform, BootMAEPretrainTransform):
        steps = transform.transform
        if not _is_compose_of(steps, (RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize)):
            return None
        crop, flip, _, normalize = steps.transforms
        twin = copy.copy(transform)
        twin.transform = _CropFlipU8(crop, flip, ratio)
        return FastTwin(twin, {"images" + NORM_SUFFIX: _norm_spec(normalize)}, fast_decode)
    if type(transform) is CAEPretrainTransform:
        if not (type(transform.flip) is RandomHorizontalFlip
                and type(transform.crop) is RandomResizedCropTwoViews
                and _is_compose_of(transform.patch_transform, (ToTensor, Normalize))
                and _is_compose_of(transform.tokenizer_transform, (ToTensor, MapPixels))):
            return None
        twin = copy.copy(transform)
        twin.flip = _FlipLater(transform.flip)
        twin.crop = _TwoViewsU8(transform.crop, ratio)
        twin.patch_transform = twin.tokenizer_transform = u8_chw
        specs = {"images" + NORM_SUFFIX: _norm_spec(transform.patch_transform.transforms[1]),
                 "tokenizer_images" + MAP_SUFFIX: _map_spec(transform.tokenizer_transform.transforms[1])}
        return FastTwin(twin, specs, fast_decode)
    return None


# ------------------------------------------------------------------ training-process side
def to_model_floats(batch):
    """Replace every uint8 image of ``batch`` that carries a conversion spec by the float32
    tensor the reference pipeline makes, with the reference's operations in its order (so
    the result is the same to the last bit on CPU). Works on Paddle tensors (on the device)
    and on numpy arrays; the spec keys are dropped. Other entries are returned as they are."""
    out = dict(batch)
    for key in list(batch):
        for suffix in (NORM_SUFFIX, MAP_SUFFIX):
            if key.endswith(suffix):
                name = key[:-len(suffix)]
                spec = out.pop(key)
                if name in out:
                    out[name] = _convert(out[name], spec, suffix)
    return out


def _convert(u8, spec, suffix):
    """The reference's float32 operations, in its order: u8 / 255, then (x - mean) / std or
    a * x + b. The division is by a 255 tensor: Paddle turns ``x / 255.0`` into a multiply by
    the rounded reciprocal, which can differ in the last bit."""
    if isinstance(u8, np.ndarray):
        x = u8.astype(np.float32) / np.float32(255.0)
        spec = np.asarray(spec, np.float32)
    else:
        import paddle

        x = u8.astype("float32") / paddle.full([1], 255.0, dtype="float32")
        spec = spec.astype("float32")
    if suffix == NORM_SUFFIX:  # spec [B, 2, 3]: per sample (mean, std)
        return (x - spec[:, 0].reshape([-1, 3, 1, 1])) / spec[:, 1].reshape([-1, 3, 1, 1])
    return spec[:, 0].reshape([-1, 1, 1, 1]) * x + spec[:, 1].reshape([-1, 1, 1, 1])  # spec [B, 2]
