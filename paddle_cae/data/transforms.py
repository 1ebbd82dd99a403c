"""Image transforms (PIL in, numpy out) and the per-method pretraining pipelines.

No torchvision: each transform re-implements the behaviour the official recipes rely on.
Randomness: geometric parameters (crop boxes, flips) and masks are drawn from a Python
``random.Random``, pixel noise from a numpy ``RandomState`` - the per-sample generators that
:func:`sample_rng` installs for the current thread (the loader does it for every sample,
seeded from (seed, epoch, index)). Outside such a block the global ``random`` module and
numpy state are used. Thread-local generators, rather than reseeding the global state, keep
the loader's prefetch thread (``num_workers=0``) from racing with the training loop's own
random draws.

The pretraining pipelines are built from these transforms' draws as explicit stages
(:mod:`.pipeline`); each method's lives in its file of ``paddle_cae.methods``.

The crop + resize of :class:`RandomResizedCrop` is one replaceable function, its
``resampler`` (the reference: Pillow's ``crop`` then ``resize``; :func:`use_resampler`).
"""
import contextlib
import math
import random
import re
import threading

import numpy as np
from PIL import Image

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)

_local = threading.local()


def _seeded(rngs, seed):
    rngs[0].seed(seed)
    rngs[1].seed(seed & 0xFFFFFFFF)
    return rngs


@contextlib.contextmanager
def sample_rng(seed):
    """Within the block, this thread's transforms and masks draw from generators seeded by ``seed``
    (``random.Random(seed)`` and ``numpy.random.RandomState(seed & 0xFFFFFFFF)``). The generator
    objects are kept per thread and nesting depth and re-seeded (far cheaper than building
    new ones, see benchmarks/README.md): the same numbers as fresh ones."""
    saved = getattr(_local, "rngs", None), getattr(_local, "seed", None)
    depth = getattr(_local, "depth", 0)
    pool = _local.__dict__.setdefault("pool", [])
    if depth == len(pool):
        pool.append((random.Random(), np.random.RandomState()))
    _local.rngs, _local.seed, _local.depth = _seeded(pool[depth], seed), seed, depth + 1
    try:
        yield
    finally:
        (_local.rngs, _local.seed), _local.depth = saved, depth


def in_sample_rng():
    """Whether this thread is inside a :func:`sample_rng` block."""
    return getattr(_local, "rngs", None) is not None


def restart_sample_rng():
    """Inside :func:`sample_rng`: re-seed the block's generators, so the next draws are the
    block's first ones again (a sample whose file turned out unreadable gives its draws to the
    one that replaces it). Returns False outside a block (nothing to restart)."""
    rngs = getattr(_local, "rngs", None)
    if rngs is None:
        return False
    _seeded(rngs, _local.seed)
    return True


def python_rng():
    """The current ``random.Random`` (or the ``random`` module outside :func:`sample_rng`)."""
    rngs = getattr(_local, "rngs", None)
    return random if rngs is None else rngs[0]


def numpy_rng():
    """The current numpy ``RandomState`` (or the global one outside :func:`sample_rng`)."""
    rngs = getattr(_local, "rngs", None)
    return np.random.mtrand._rand if rngs is None else rngs[1]


_INTERPOLATIONS = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
}


def pil_interpolation(name):
    """PIL resampling filter for a name (``bicubic``, ``lanczos``, ...) or ``random``
    (bilinear or bicubic, chosen per call, as timm does)."""
    if not isinstance(name, str):
        return name
    key = name.lower()
    if key == "random":
        return "random"
    if key not in _INTERPOLATIONS:
        raise ValueError(f"unknown interpolation '{name}'; expected one of {sorted(_INTERPOLATIONS)} or 'random'")
    return _INTERPOLATIONS[key]


def _resolve_interpolation(interpolation):
    if interpolation == "random":
        return python_rng().choice((Image.BILINEAR, Image.BICUBIC))
    return interpolation


def _pair(size):
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def mean_std(imagenet_default_mean_and_std):
    """ImageNet mean/std when the flag is on, otherwise 0.5/0.5 (the official default for
    CAE/BootMAE on non-ImageNet data)."""
    if imagenet_default_mean_and_std:
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return HALF_MEAN, HALF_STD


# ------------------------------------------------------------------------- the resampler
class PillowResampler:
    """The reference crop + resize: Pillow's ``crop`` then ``resize`` (a box given to
    ``resize`` would let the filter read pixels outside it)."""

    name = "Pillow"

    def __call__(self, img, box, size, resample, mirror_src=False, mirror_out=False, span=None):
        """uint8 ``[3, size[1], size[0]]``: ``img`` mirrored left-right first with
        ``mirror_src`` (``box`` is a box of the mirrored image), cropped to ``box`` and resized
        to ``size`` (w, h) with the filter ``resample``, mirrored with ``mirror_out``. With
        ``span`` (a float box, after a reduced decode): the whole image resized with
        ``box=span`` instead."""
        if mirror_src:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if span is None:
            out = img.crop(tuple(box)).resize(tuple(size), resample)
        else:
            out = img.resize(tuple(size), resample, box=tuple(span))
        if mirror_out:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return np.ascontiguousarray(np.asarray(out).transpose(2, 0, 1))

    def image(self, img, box, size, resample):
        """PIL image in, PIL image out: ``img.crop(box).resize(size, resample)`` (the
        PIL-image transforms' crop, :class:`.transforms.RandomResizedCrop`)."""
        return img.crop(tuple(box)).resize(tuple(size), resample)

    def __repr__(self):
        return f"{type(self).__name__}()"


PILLOW = PillowResampler()


def use_resampler(transform, resampler):
    """Give ``transform`` (a pipeline, a ``Compose`` or one transform) and every stage inside
    it that crops and resizes the crop + resize function ``resampler``; returns
    ``transform``. Stages declare it with a ``use_resampler(resampler)`` method."""
    if hasattr(transform, "use_resampler"):
        transform.use_resampler(resampler)
    return transform


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x

    def use_resampler(self, resampler):
        for t in self.transforms:
            use_resampler(t, resampler)

    def __repr__(self):
        inner = "".join(f"\n  {t!r}," for t in self.transforms)
        return f"Compose({inner}\n)"


def resized_crop(img, top, left, height, width, size, interpolation, resampler=PILLOW):
    """Crop the box (top, left, height, width) and resize it to ``size`` (h, w) with
    ``resampler`` (the reference: PIL's ``crop`` then ``resize``)."""
    out_h, out_w = _pair(size)
    box = (left, top, left + width, top + height)
    return resampler.image(img, box, (out_w, out_h), _resolve_interpolation(interpolation))


class RandomResizedCrop:
    """Random area fraction in ``scale`` and log-uniform aspect ratio in ``ratio``; up to 10
    tries for a box that fits, otherwise the largest centred box with a ratio in range."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), interpolation="bicubic"):
        self.size = _pair(size)
        if scale[0] > scale[1] or ratio[0] > ratio[1]:
            raise ValueError(f"scale and ratio must be (min, max), got scale={scale}, ratio={ratio}")
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.interpolation = pil_interpolation(interpolation)
        self.resampler = PILLOW

    def use_resampler(self, resampler):
        self.resampler = resampler

    @staticmethod
    def get_params(img, scale, ratio, attempts=10):
        rng = python_rng()
        width, height = img.size
        area = width * height
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(attempts):
            target_area = rng.uniform(*scale) * area
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                return top, left, h, w
        # fallback: centre crop with the aspect ratio clamped into range
        in_ratio = width / height
        if in_ratio < min(ratio):
            w = width
            h = int(round(w / min(ratio)))
        elif in_ratio > max(ratio):
            h = height
            w = int(round(h * max(ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img):
        top, left, h, w = self.get_params(img, self.scale, self.ratio)
        return resized_crop(img, top, left, h, w, self.size, self.interpolation, self.resampler)

    def __repr__(self):
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomResizedCropTF(RandomResizedCrop):
    """MAE's linear-probe crop: draw area and log-ratio ONCE, clamp w and h to the image, and
    place the box uniformly (no retry loop, no centre fallback)."""

    @staticmethod
    def get_params(img, scale, ratio, attempts=None):
        rng = python_rng()
        width, height = img.size
        target_area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = min(max(int(round(math.sqrt(target_area * aspect))), 1), width)
        h = min(max(int(round(math.sqrt(target_area / aspect))), 1), height)
        return rng.randint(0, height - h), rng.randint(0, width - w), h, w

    def __repr__(self):
        return f"RandomResizedCropTF(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def draw(self):
        """Whether this call flips (one draw from the sample's generator)."""
        return python_rng().random() < self.p

    def __call__(self, img):
        return img.transpose(Image.FLIP_LEFT_RIGHT) if self.draw() else img

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class Resize:
    """``size`` int: shorter side -> size, aspect kept; (h, w): exact size."""

    def __init__(self, size, interpolation="bicubic"):
        self.size = size
        self.interpolation = pil_interpolation(interpolation)

    def __call__(self, img):
        width, height = img.size
        if isinstance(self.size, (int, np.integer)):
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = int(self.size), int(self.size * long / short)
            out_w, out_h = (new_short, new_long) if width <= height else (new_long, new_short)
        else:
            out_h, out_w = _pair(self.size)
        if (out_w, out_h) == (width, height):
            return img
        return img.resize((out_w, out_h), _resolve_interpolation(self.interpolation))

    def __repr__(self):
        return f"Resize(size={self.size})"


class CenterCrop:
    def __init__(self, size):
        self.size = _pair(size)

    def __call__(self, img):
        width, height = img.size
        th, tw = self.size
        if th > height or tw > width:  # pad like torchvision would, with black
            canvas = Image.new(img.mode, (max(width, tw), max(height, th)))
            canvas.paste(img, ((max(width, tw) - width) // 2, (max(height, th) - height) // 2))
            img, (width, height) = canvas, canvas.size
        top = int(round((height - th) / 2.0))
        left = int(round((width - tw) / 2.0))
        return img.crop((left, top, left + tw, top + th))

    def __repr__(self):
        return f"CenterCrop(size={self.size})"


class RandomCrop:
    """torchvision ``RandomCrop(size, padding)`` with its defaults: pad every side by ``padding``
    black pixels, then crop ``size`` at a uniformly drawn offset (top in 0..H-h, left in 0..W-w)."""

    def __init__(self, size, padding=4):
        self.size = _pair(size)
        self.padding = int(padding)

    def __call__(self, img):
        if self.padding:
            width, height = img.size
            p = self.padding
            canvas = Image.new(img.mode, (width + 2 * p, height + 2 * p))  # zeros: black
            canvas.paste(img, (p, p))
            img = canvas
        width, height = img.size
        th, tw = self.size
        if th > height or tw > width:
            raise ValueError(f"RandomCrop: crop size {th}x{tw} is larger than the padded image "
                             f"{height}x{width}")
        rng = python_rng()
        top, left = rng.randint(0, height - th), rng.randint(0, width - tw)
        return img.crop((left, top, left + tw, top + th))

    def __repr__(self):
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class ToTensor:
    """PIL RGB image -> float32 ``[3, H, W]`` in [0, 1]."""

    def __call__(self, img):
        arr = np.asarray(img, dtype=np.float32)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return np.ascontiguousarray(arr.transpose(2, 0, 1)) / 255.0

    def __repr__(self):
        return "ToTensor()"


class Normalize:
    def __init__(self, mean, std):
        self.mean = np.asarray(mean, np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(-1, 1, 1)

    def __call__(self, chw):
        return ((chw - self.mean) / self.std).astype(np.float32, copy=False)

    def __repr__(self):
        return f"Normalize(mean={self.mean.ravel().tolist()}, std={self.std.ravel().tolist()})"


class MapPixels:
    """DALL-E's input mapping x -> (1 - 2 eps) x + eps (eps 0.1: [0, 1] -> [0.1, 0.9])."""

    def __init__(self, eps=0.1):
        self.eps = eps

    def __call__(self, chw):
        return ((1 - 2 * self.eps) * chw + self.eps).astype(np.float32, copy=False)

    def __repr__(self):
        return f"MapPixels(eps={self.eps})"


# ----------------------------------------------------------------- config access helpers
def _get(args, name, default=None):
    """Read ``name`` from a Namespace, a dict or any object; None counts as missing."""
    value = args.get(name) if isinstance(args, dict) else getattr(args, name, None)
    return default if value is None else value


def patch_size_of(args, default=16):
    """Patch size from ``patch_size`` (the engine sets the built model's,
    :meth:`paddle_cae.models.base.PretrainingModel.input_patch_size`) or
    ``--model_args {"patch_size": ..}``, else ``default``."""
    value = _get(args, "patch_size")
    if value is None:
        model_args = _get(args, "model_args", {}) or {}
        value = model_args.get("patch_size") if isinstance(model_args, dict) else None
    return int(default if value is None else value)


def window_size_of(args):
    """Patch grid (H, W) = input_size // patch_size."""
    input_size = int(_get(args, "input_size", 224))
    patch = patch_size_of(args)
    if input_size % patch:
        raise ValueError(f"--input_size {input_size} is not a multiple of the patch size {patch}")
    return input_size // patch, input_size // patch


def bool_mask(generator):
    """One mask of ``generator`` drawn from the sample's generator, as a flat bool array."""
    return np.asarray(generator(rng=python_rng()), dtype=bool).reshape(-1)


# ----------------------------------------------------------------------- eval / probing
def _beit_eval_rules(method):
    """``method``: the run's :class:`paddle_cae.methods.Method` (its ``beit_eval_rules``), or
    None (MAE's rules)."""
    if isinstance(method, str):
        raise TypeError(f"pass the method itself (paddle_cae.methods.get_method({method!r})), not its name")
    return bool(getattr(method, "beit_eval_rules", False))


def small_image_path(method, input_size):
    """True where the official fine-tune ``build_transform`` takes its small-image branch: methods
    on BEiT's code (CAE, BootMAE: ``Method.beit_eval_rules``) for ``input_size <= 32``
    (CIFAR-style data). Training then starts with ``RandomCrop(input_size, padding=4)`` instead
    of the random resized crop, and evaluation skips the resize and centre crop. MAE's
    ``build_transform`` has no such branch."""
    return _beit_eval_rules(method) and int(input_size) <= 32


def default_crop_pct(input_size, method=None):
    """The evaluation crop fraction when ``--crop_pct`` is unset: 224/256 below the method's
    threshold, else 1. MAE: up to 224 px; BEiT's code (CAE, BootMAE): below 384 px."""
    if _beit_eval_rules(method):
        return 224 / 256 if input_size < 384 else 1.0
    return 224 / 256 if input_size <= 224 else 1.0


def build_eval_transform(input_size=224, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                         crop_pct=None, interpolation="bicubic", method=None):
    """Resize the shorter side to input_size / crop_pct (default :func:`default_crop_pct`) and
    centre-crop input_size. ``method`` (a Method; None = MAE's rules) selects the
    official per-method rules: CAE/BootMAE at ``input_size <= 32`` only convert and normalise
    (see :func:`small_image_path`)."""
    if small_image_path(method, input_size):
        return Compose([ToTensor(), Normalize(mean, std)])
    if crop_pct is None:
        crop_pct = default_crop_pct(input_size, method)
    return Compose([
        Resize(int(input_size / crop_pct), interpolation),
        CenterCrop(input_size),
        ToTensor(),
        Normalize(mean, std),
    ])


def build_linprobe_transform(input_size=224, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """MAE linear-probe training: TF-style crop (bicubic) + flip + normalise."""
    return Compose([
        RandomResizedCropTF(input_size, interpolation="bicubic"),
        RandomHorizontalFlip(),
        ToTensor(),
        Normalize(mean, std),
    ])


# ------------------------------------------------------------------ fine-tune augmentation
_MAX_LEVEL = 10.0


def _signed(value):
    return -value if python_rng().random() < 0.5 else value


def _affine(img, matrix, fill, resample):
    return img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


def _enhance(kind):
    from PIL import ImageEnhance

    enhancer = getattr(ImageEnhance, kind)
    return lambda img, factor, **_: enhancer(img).enhance(factor)


def _posterize(img, bits, **_):
    """Keep the ``bits`` high bits of every channel. ``bits >= 8`` is the identity (as in timm).
    ``bits == 0`` gives the all-black image that older Pillow returned (its LUT masked every value
    with ``~(2 ** 8 - 1)`` = 0); current Pillow (13) rejects 0, so that case is written out here.
    RandAugment's ``PosterizeIncreasing`` reaches 0 bits at magnitude 10."""
    from PIL import ImageOps

    bits = int(bits)
    if bits >= 8:
        return img
    if bits <= 0:
        return img.point([0] * (256 * len(img.getbands())))
    return ImageOps.posterize(img, bits)


def _solarize_add(img, add, threshold=128, **_):
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _ops():
    from PIL import ImageOps

    def enhance_level(level):  # increasing: stronger change with level, either direction
        return (1.0 + _signed(level / _MAX_LEVEL * 0.9),)

    return {
        "AutoContrast": (lambda img, **_: ImageOps.autocontrast(img), lambda level: ()),
        "Equalize": (lambda img, **_: ImageOps.equalize(img), lambda level: ()),
        "Invert": (lambda img, **_: ImageOps.invert(img), lambda level: ()),
        "Rotate": (lambda img, degrees, fill, resample: img.rotate(degrees, resample=resample, fillcolor=fill),
                   lambda level: (_signed(level / _MAX_LEVEL * 30.0),)),
        "PosterizeIncreasing": (_posterize,
                                lambda level: (4 - int(level / _MAX_LEVEL * 4),)),
        "SolarizeIncreasing": (lambda img, threshold, **_: ImageOps.solarize(img, threshold),
                               lambda level: (256 - int(level / _MAX_LEVEL * 256),)),
        "SolarizeAdd": (_solarize_add, lambda level: (int(level / _MAX_LEVEL * 110),)),
        "ColorIncreasing": (_enhance("Color"), enhance_level),
        "ContrastIncreasing": (_enhance("Contrast"), enhance_level),
        "BrightnessIncreasing": (_enhance("Brightness"), enhance_level),
        "SharpnessIncreasing": (_enhance("Sharpness"), enhance_level),
        "ShearX": (lambda img, s, fill, resample: _affine(img, (1, s, 0, 0, 1, 0), fill, resample),
                   lambda level: (_signed(level / _MAX_LEVEL * 0.3),)),
        "ShearY": (lambda img, s, fill, resample: _affine(img, (1, 0, 0, s, 1, 0), fill, resample),
                   lambda level: (_signed(level / _MAX_LEVEL * 0.3),)),
        "TranslateXRel": (lambda img, pct, fill, resample: _affine(img, (1, 0, pct * img.size[0], 0, 1, 0),
                                                                   fill, resample),
                          lambda level: (_signed(level / _MAX_LEVEL * 0.45),)),
        "TranslateYRel": (lambda img, pct, fill, resample: _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]),
                                                                   fill, resample),
                          lambda level: (_signed(level / _MAX_LEVEL * 0.45),)),
    }


RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                       "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                       "TranslateXRel", "TranslateYRel")


class RandAugment:
    """RandAugment with the timm semantics of ``rand-m9-mstd0.5-inc1``: ``num_ops`` ops drawn with
    replacement from the increasing-severity set, each applied with probability ``op_prob``
    at magnitude ~ N(magnitude, magnitude_std) clipped to [0, 10]; geometric ops fill with
    ``fill`` (the mean colour) and resample bicubic."""

    def __init__(self, num_ops=2, magnitude=9.0, magnitude_std=0.5, op_prob=0.5, fill=(124, 116, 104),
                 resample="bicubic", ops=RAND_INCREASING_OPS):
        table = _ops()
        unknown = [name for name in ops if name not in table]
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}; known: {sorted(table)}")
        self.ops = [(name, table[name]) for name in ops]
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.op_prob = op_prob
        self.fill = tuple(int(v) for v in fill)
        self.resample = pil_interpolation(resample)

    @classmethod
    def from_string(cls, spec, fill=(124, 116, 104)):
        """Parse timm's ``rand-m9-mstd0.5-inc1`` style (n = ops, m = magnitude, mstd, inc)."""
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ValueError(f"RandAugment spec must start with 'rand', got '{spec}'")
        kwargs = {}
        for part in parts[1:]:
            key, value = re.match(r"([a-z]+)([\d.]+)", part).groups()
            if key == "m":
                kwargs["magnitude"] = float(value)
            elif key == "n":
                kwargs["num_ops"] = int(value)
            elif key == "mstd":
                kwargs["magnitude_std"] = float(value)
            elif key == "inc":
                if not int(value):
                    raise NotImplementedError("only the increasing op set (inc1) is implemented")
            else:
                raise ValueError(f"unknown RandAugment option '{part}' in '{spec}'")
        return cls(fill=fill, **kwargs)

    def __call__(self, img):
        rng = python_rng()
        picks = [self.ops[rng.randrange(len(self.ops))] for _ in range(self.num_ops)]
        for _, (apply, level_to_args) in picks:
            if self.op_prob < 1.0 and rng.random() > self.op_prob:
                continue
            magnitude = self.magnitude
            if self.magnitude_std > 0:
                magnitude = rng.gauss(magnitude, self.magnitude_std)
            magnitude = min(_MAX_LEVEL, max(0.0, magnitude))
            img = apply(img, *level_to_args(magnitude), fill=self.fill, resample=self.resample)
        return img

    def __repr__(self):
        return (f"RandAugment(n={self.num_ops}, m={self.magnitude}, mstd={self.magnitude_std}, "
                f"ops={[name for name, _ in self.ops]})")


class RandomErasing:
    """Erase one random rectangle of a normalised CHW array with probability ``p`` (timm
    'pixel' mode: per-pixel N(0, 1) values), area fraction in [min_area, max_area], aspect
    ratio log-uniform in [min_aspect, 1/min_aspect], up to 10 tries."""

    def __init__(self, p=0.25, min_area=0.02, max_area=1 / 3, min_aspect=0.3, max_aspect=None,
                 mode="pixel"):
        if mode not in ("pixel", "const"):
            raise ValueError(f"random erasing mode must be 'pixel' or 'const', got '{mode}'")
        self.p = p
        self.min_area, self.max_area = min_area, max_area
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.mode = mode

    def __call__(self, chw):
        rng = python_rng()
        if rng.random() > self.p:
            return chw
        channels, height, width = chw.shape
        area = height * width
        for _ in range(10):
            target = rng.uniform(self.min_area, self.max_area) * area
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < width and h < height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                chw = chw.copy()
                if self.mode == "pixel":
                    chw[:, top:top + h, left:left + w] = numpy_rng().standard_normal((channels, h, w))
                else:
                    chw[:, top:top + h, left:left + w] = 0.0
                break
        return chw

    def __repr__(self):
        return f"RandomErasing(p={self.p}, area=({self.min_area}, {self.max_area:.3f}), mode={self.mode})"


def build_finetune_transform(input_size=224, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                             auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, scale=(0.08, 1.0),
                             interpolation="bicubic", method=None):
    """Fine-tune training: crop (bicubic) -> flip -> RandAugment -> ToTensor -> Normalize ->
    RandomErasing. ``auto_augment``/``reprob`` None or 0 turn those steps off. ``method``
    (a Method; None = MAE's rules): for CAE/BootMAE at ``input_size <= 32`` the
    first step is ``RandomCrop(input_size, padding=4)`` (:func:`small_image_path`)."""
    if small_image_path(method, input_size):
        first = RandomCrop(input_size, padding=4)
    else:
        first = RandomResizedCrop(input_size, scale=scale, interpolation=interpolation)
    steps = [first, RandomHorizontalFlip()]
    if auto_augment:
        fill = tuple(min(255, round(255 * m)) for m in mean)
        steps.append(RandAugment.from_string(auto_augment, fill=fill))
    steps += [ToTensor(), Normalize(mean, std)]
    if reprob:
        steps.append(RandomErasing(p=reprob))
    return Compose(steps)
