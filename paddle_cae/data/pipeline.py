"""Pretraining pipelines as explicit stages: decode/crop -> flip -> uint8 -> float on the device.

A :class:`Pipeline` takes an :class:`ImageSource` (an image file opened for its header: the
size is known, no pixel is decoded yet) and returns a sample dict whose images are uint8
``[3, H, W]`` arrays, plus its other arrays (masks, noise, ...). Its stages, in the order
the official recipes apply them:

* **crop + resize** (:class:`CropFlip`, :class:`FlipTwoViews`): the crop box is drawn from the
  image size, the file is decoded (at 1/2, 1/4 or 1/8 of its size with ``fast_decode``, see
  :func:`decode_ratio`), and the box is cropped, resized and mirrored by ONE replaceable
  function, the pipeline's ``resampler``. The reference is Pillow's ``crop`` then ``resize``
  (:class:`PillowResampler`); ``paddle_cae.fast.data.accelerate_dataset`` swaps in an exact
  C implementation (the same pixels) through :func:`use_resampler`;
* **flip**: drawn in the recipe's order, applied by the resampler (source or output mirrored);
* **uint8**: the hand-over (4x less to collate, copy and send through shared memory than
  float32);
* **to float**: ``Pipeline.conversions`` (image key -> :class:`ToFloat`) states once per run
  how each image becomes the model's float32 tensor (ImageNet or 0.5 mean/std, DALL-E's
  map_pixels); the training step applies it on the device (:func:`to_model_floats`), with the
  reference's float32 operations in their order (``ToTensor`` then ``Normalize`` /
  ``MapPixels``: the same numbers to the last bit on CPU).

Every random number is drawn from the per-sample generators (:func:`.transforms.sample_rng`)
in the order the reference draws it, before anything is decoded: an unreadable file leaves
the draws to the sample that replaces it. A pipeline also takes a decoded PIL image
(:meth:`ImageSource.of_image`), for tests and custom loaders.

The method-specific pipelines (what each recipe samples) live in ``paddle_cae.methods``.
"""
import numpy as np
from PIL import Image

from .transforms import PILLOW, PillowResampler, RandomHorizontalFlip, RandomResizedCrop, _resolve_interpolation, use_resampler

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
    ``ratio``: the reduced-decoding setting (:func:`decode_ratio`; 0 decodes in full)."""

    def __init__(self, path, ratio=0.0):
        self.path = path
        self.img = Image.open(path)
        self.size = self.img.size
        self.ratio = float(ratio)

    @classmethod
    def of_image(cls, img):
        """A source over an already decoded PIL image (decoded in full, as it is)."""
        source = cls.__new__(cls)
        source.path, source.img, source.size, source.ratio = None, img, img.size, 0.0
        return source

    def decode(self, crop_w, crop_h, out_w, out_h):
        """(RGB image, scale): the pixels, decoded at 1/scale of the file's size. Reduced
        decoding only for JPEG with ``ratio`` > 0, when :func:`draft_scale` allows it for a
        ``crop_w`` x ``crop_h`` crop resized to ``out_w`` x ``out_h``."""
        img = self.img
        scale = 1.0
        try:
            if self.ratio > 0 and img.format == "JPEG":
                s = draft_scale(crop_w, crop_h, out_w, out_h, self.ratio)
                drafted = img.draft(None, (self.size[0] // s, self.size[1] // s)) if s > 1 else None
                if drafted is not None:  # (mode, the full image's box in the reduced one)
                    scale = self.size[0] / drafted[1][2]
            img.load()
            if img.mode != "RGB":
                img = img.convert("RGB")
        except Exception as err:  # noqa: BLE001  any decoder error means "unreadable"
            self.img.close()
            raise UnreadableImage(f"{type(err).__name__}: {err}") from err
        return img, scale


# ------------------------------------------------------------------------------- stages
def resized_views(source, params, outputs, resampler, mirror_src=False, mirror_out=False):
    """The crop ``params`` (top, left, h, w; drawn on the image as mirrored by
    ``mirror_src``) resized to each output (size (h, w), filter) by ``resampler``, mirrored
    with ``mirror_out``, as uint8 ``[3, h, w]`` arrays. The file is decoded here, reduced
    where the source allows it for the first output: the box is then given in the reduced
    image's coordinates."""
    top, left, h, w = params
    out_h, out_w = outputs[0][0]
    img, scale = source.decode(w, h, out_w, out_h)
    if scale == 1.0:
        box, span = (left, top, left + w, top + h), None
    else:
        # pixel j of a 1/s decode covers pixels [j s, (j + 1) s) of the file; a mirrored
        # decode is shifted by its rounded-up width
        shift = img.size[0] - source.size[0] / scale if mirror_src else 0.0
        box, span = None, (left / scale + shift, top / scale, (left + w) / scale + shift, (top + h) / scale)
    return [resampler(img, box, (ow, oh), f, mirror_src, mirror_out, span=span)
            for (oh, ow), f in outputs]


class CropFlip:
    """RandomResizedCrop then RandomHorizontalFlip of the crop (MAE, BootMAE): one uint8
    view. Draws in the reference's order: crop box, filter (for 'random'), flip."""

    def __init__(self, size, scale=(0.08, 1.0), interpolation="bicubic"):
        self.crop = RandomResizedCrop(size, scale=scale, interpolation=interpolation)
        self.flip = RandomHorizontalFlip()

    def __call__(self, source, resampler):
        crop = self.crop
        params = crop.get_params(source, crop.scale, crop.ratio)
        outputs = [(crop.size, _resolve_interpolation(crop.interpolation))]
        flip = self.flip.draw()
        view, = resized_views(source, params, outputs, resampler, mirror_out=flip)
        return view

    def __repr__(self):
        return f"CropFlip({self.crop!r}, {self.flip!r})"


class FlipTwoViews:
    """RandomHorizontalFlip of the whole image, then ONE RandomResizedCrop box resized twice
    (CAE: the encoder's view and the tokenizer's). Draws: flip, crop box, the two filters."""

    def __init__(self, size, second_size, scale=(0.08, 1.0), interpolation="bicubic",
                 second_interpolation="lanczos"):
        self.flip = RandomHorizontalFlip()
        self.crop = RandomResizedCrop(size, scale=scale, interpolation=interpolation)
        self.second = RandomResizedCrop(second_size, scale=scale, interpolation=second_interpolation)

    def __call__(self, source, resampler):
        flipped = self.flip.draw()
        crop = self.crop
        params = crop.get_params(source, crop.scale, crop.ratio)
        outputs = [(crop.size, _resolve_interpolation(crop.interpolation)),
                   (self.second.size, _resolve_interpolation(self.second.interpolation))]
        return tuple(resized_views(source, params, outputs, resampler, mirror_src=flipped))

    def __repr__(self):
        return (f"FlipTwoViews({self.flip!r}, {self.crop!r}, second size {self.second.size}, "
                f"{self.second.interpolation})")


# --------------------------------------------------------------------------- to float
class ToFloat:
    """uint8 -> float32 as the reference pipeline does it: ``x = u8 / 255`` (``ToTensor``),
    then ``(x - mean) / std`` (``Normalize``) or ``a * x + b`` (DALL-E's map_pixels,
    ``MapPixels``). Works on numpy arrays and on Paddle tensors (on the device), any leading
    dimensions before the channel one."""

    def __init__(self, mean=None, std=None, scale=None, shift=None):
        self.mean = None if mean is None else np.asarray(mean, np.float32).reshape(3)
        self.std = None if std is None else np.asarray(std, np.float32).reshape(3)
        self.scale = None if scale is None else np.float32(scale)
        self.shift = None if shift is None else np.float32(shift)
        self._tensors = {}

    @classmethod
    def normalise(cls, mean, std):
        return cls(mean=mean, std=std)

    @classmethod
    def map_pixels(cls, eps=0.1):
        """DALL-E's input mapping x -> (1 - 2 eps) x + eps (eps 0.1: [0, 1] -> [0.1, 0.9])."""
        return cls(scale=1 - 2 * eps, shift=eps)

    def _shaped(self, u8):
        lead = [1] * (len(u8.shape) - 3)
        if self.mean is not None:
            return [v.reshape(lead + [3, 1, 1]) for v in (self.mean, self.std)]
        return [np.full(lead + [1, 1, 1], v, np.float32) for v in (self.scale, self.shift)]

    def __call__(self, u8):
        a, b = self._shaped(u8)
        if isinstance(u8, np.ndarray):
            x = u8.astype(np.float32) / np.float32(255.0)
        else:
            import paddle

            # by a 255 tensor: Paddle turns ``x / 255.0`` into a multiply by the rounded
            # reciprocal, which can differ in the last bit
            x = u8.astype("float32") / paddle.full([1], 255.0, dtype="float32")
            key = (len(u8.shape), str(u8.place))
            if key not in self._tensors:
                self._tensors[key] = (paddle.to_tensor(a, place=u8.place), paddle.to_tensor(b, place=u8.place))
            a, b = self._tensors[key]
        if self.mean is not None:
            return (x - a) / b
        return a * x + b

    def __repr__(self):
        if self.mean is not None:
            return f"ToFloat(normalise mean={self.mean.tolist()}, std={self.std.tolist()})"
        return f"ToFloat(map_pixels {float(self.scale):g} x + {float(self.shift):g})"

    def __getstate__(self):  # the device tensors stay in the process that made them
        return dict(self.__dict__, _tensors={})


def to_model_floats(batch, conversions):
    """Replace every uint8 image of ``batch`` named in ``conversions`` (key -> :class:`ToFloat`)
    by its float32 tensor; entries already float (a float32 hand-over) and others are
    returned as they are."""
    out = dict(batch)
    for key, convert in conversions.items():
        value = out.get(key)
        if value is not None and _is_uint8(value):
            out[key] = convert(value)
    return out


def _is_uint8(value):
    if isinstance(value, np.ndarray):
        return value.dtype == np.uint8
    return "uint8" in str(getattr(value, "dtype", ""))


# ----------------------------------------------------------------------------- pipeline
class Pipeline:
    """A pretraining pipeline: ``sample(source)`` -> dict of uint8 images and other arrays;
    ``conversions``: image key -> :class:`ToFloat`, applied on the device; ``resampler``:
    the crop + resize every stage uses (the reference: :data:`PILLOW`). Subclasses (one per
    method, in ``paddle_cae.methods``) define ``sample`` from the stages above."""

    conversions = {}
    resampler = PILLOW

    def __call__(self, source):
        if isinstance(source, Image.Image):
            source = ImageSource.of_image(source.convert("RGB") if source.mode != "RGB" else source)
        return self.sample(source)

    def sample(self, source):
        raise NotImplementedError

    def use_resampler(self, resampler):
        self.resampler = resampler

    def to_floats(self, sample):
        """The sample with its images as float32 (the device conversion, here in numpy)."""
        return to_model_floats(sample, self.conversions)


__all__ = ["CropFlip", "FlipTwoViews", "HANDOVERS", "ImageSource", "PILLOW", "Pipeline",
           "PillowResampler", "ToFloat", "UnreadableImage", "decode_ratio", "draft_scale",
           "resized_views", "to_model_floats", "use_resampler"]
