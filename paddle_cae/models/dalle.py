"""DALL-E dVAE encoder: CAE's frozen target tokenizer.

Image (after :func:`map_pixels`) -> logits over ``vocab_size`` codes on a grid 8x smaller
-> token ids by argmax. Parameter names equal the official state_dict keys
(``blocks.input.w``, ``blocks.group_1.block_1.res_path.conv_1.w``, ...,
``blocks.output.conv.w``) and conv weights keep PyTorch's ``[out, in, k, k]`` layout, so
converting the official weights is a plain copy.

The official ``encoder.pkl`` is a pickled whole module; :func:`load_dalle_encoder` reads
it through :func:`paddle_cae.io.read_weights` (no torch), checks every key and shape against the
architecture, and caches the converted weights as a ``.pd`` file for later runs.
"""
import math
import os
from pathlib import Path

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..io import CheckpointError, TorchModuleStub, module_state_dict, read_weights, save_checkpoint
from ..io.weights import key_mismatch
from .registry import register_model

__all__ = [
    "DalleEncoder",
    "DalleWeightsError",
    "map_pixels",
    "load_dalle_encoder",
    "dalle_state_shapes",
    "check_dalle_state",
    "infer_dalle_arch",
    "dalle_encoder",
    "dalle_encoder_tiny",
    "RELEASE_ARCH",
]

LOGIT_LAPLACE_EPS = 0.1
RELEASE_ARCH = dict(group_count=4, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192)
RELEASE_URL = "https://cdn.openai.com/dall-e/encoder.pkl"


def map_pixels(x, eps=LOGIT_LAPLACE_EPS):
    """[0, 1] pixels -> the encoder's input range: ``(1 - 2 eps) x + eps`` (0.8x + 0.1)."""
    return (1 - 2 * eps) * x + eps


class Conv2d(nn.Layer):
    """Conv with 'same' padding whose parameters are named ``w`` [out, in, k, k] and ``b``,
    as in the official module. Init (training from scratch only): w ~ N(0, 1/(in k^2)), b = 0."""

    def __init__(self, n_in, n_out, kernel_size):
        super().__init__()
        self.padding = (kernel_size - 1) // 2
        std = 1.0 / math.sqrt(n_in * kernel_size ** 2)
        self.w = self.create_parameter(
            [n_out, n_in, kernel_size, kernel_size],
            default_initializer=nn.initializer.Normal(0.0, std))
        self.b = self.create_parameter([n_out], is_bias=True,
                                       default_initializer=nn.initializer.Constant(0.0))

    def forward(self, x):
        # the bias is added apart from the convolution, as F.conv2d does internally
        return F.conv2d(x, self.w, padding=self.padding) + self.b.reshape([1, -1, 1, 1])


class EncoderBlock(nn.Layer):
    """out = id_path(x) + post_gain * res_path(x); res_path is pre-activation (ReLU before
    each of its four convs); id_path is a 1x1 conv only when the width changes."""

    def __init__(self, n_in, n_out, n_layers):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1.0 / n_layers ** 2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            ("relu_1", nn.ReLU()), ("conv_1", Conv2d(n_in, n_hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", Conv2d(n_hid, n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", Conv2d(n_hid, n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", Conv2d(n_hid, n_out, 1)),
        )

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Layer):
    """The dVAE encoder. Group g (1-based) has width 2^(g-1) * n_hid and
    ``n_blk_per_group`` blocks; every group but the last ends with a 2x2 max-pool; the head
    is ReLU + 1x1 conv to ``vocab_size`` logits. Release: 4 groups, n_hid 256, 2 blocks per
    group, vocab 8192 -> 112x112 images give 14x14 tokens.

    The tokenizer is frozen: parameters have ``stop_gradient=True``, the layer is built in
    eval mode, and :meth:`get_codebook_indices` runs without gradient."""

    def __init__(self, group_count=4, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192):
        super().__init__()
        for name, value in (("group_count", group_count), ("n_hid", n_hid),
                            ("n_blk_per_group", n_blk_per_group),
                            ("input_channels", input_channels), ("vocab_size", vocab_size)):
            if int(value) != value or value < 1:
                raise ValueError(f"DalleEncoder: {name} must be a positive integer, got {value!r}")
        if n_hid < 4:
            raise ValueError(f"DalleEncoder: n_hid must be at least 4 (blocks use n_hid // 4), got {n_hid}")
        self.group_count = group_count
        self.n_hid = n_hid
        self.n_blk_per_group = n_blk_per_group
        self.input_channels = input_channels
        self.vocab_size = vocab_size
        self.downsample = 2 ** (group_count - 1)
        n_layers = group_count * n_blk_per_group

        layers = [("input", Conv2d(input_channels, n_hid, 7))]
        width = n_hid
        for g in range(1, group_count + 1):
            out_width = n_hid * 2 ** (g - 1)
            group = []
            for i in range(1, n_blk_per_group + 1):
                group.append((f"block_{i}", EncoderBlock(width if i == 1 else out_width, out_width, n_layers)))
            if g < group_count:
                group.append(("pool", nn.MaxPool2D(kernel_size=2)))
            layers.append((f"group_{g}", nn.Sequential(*group)))
            width = out_width
        layers.append(("output", nn.Sequential(("relu", nn.ReLU()), ("conv", Conv2d(width, vocab_size, 1)))))
        self.blocks = nn.Sequential(*layers)

        for p in self.parameters():
            p.stop_gradient = True
        self.eval()

    def arch(self):
        return dict(group_count=self.group_count, n_hid=self.n_hid, n_blk_per_group=self.n_blk_per_group,
                    input_channels=self.input_channels, vocab_size=self.vocab_size)

    def _check_input(self, x):
        if x.ndim != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f"DalleEncoder expects images [B, {self.input_channels}, H, W], got {list(x.shape)}")
        if x.dtype != paddle.float32:
            raise ValueError(f"DalleEncoder expects float32 input, got {x.dtype}")

    def forward(self, x):
        """x: mapped images [B, C, H, W] float32 -> logits [B, vocab, H/8, W/8]."""
        self._check_input(x)
        return self.blocks(x)

    @paddle.no_grad()
    def get_codebook_indices(self, images_mapped):
        """Token ids int64 [B, h*w] (argmax over the vocabulary, grid flattened row-major)."""
        self._check_input(images_mapped)
        logits = self.blocks(images_mapped)                         # [B, vocab, h, w]
        tokens = paddle.argmax(logits, axis=1)                      # [B, h, w]
        return tokens.reshape([tokens.shape[0], -1]).astype("int64")  # [B, h*w]


# ---------------------------------------------------------------------------------- weights
class DalleWeightsError(ValueError):
    """DALL-E encoder weights cannot be used; the message is one line naming the file."""


def dalle_state_shapes(group_count=4, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192):
    """Official state_dict key -> shape for an architecture (no model is built)."""
    shapes = {"blocks.input.w": (n_hid, input_channels, 7, 7), "blocks.input.b": (n_hid,)}
    n_layers_width = n_hid
    for g in range(1, group_count + 1):
        out_width = n_hid * 2 ** (g - 1)
        for i in range(1, n_blk_per_group + 1):
            n_in = n_layers_width if i == 1 else out_width
            hid = out_width // 4
            prefix = f"blocks.group_{g}.block_{i}"
            if n_in != out_width:
                shapes[f"{prefix}.id_path.w"] = (out_width, n_in, 1, 1)
                shapes[f"{prefix}.id_path.b"] = (out_width,)
            for j, (a, b, k) in enumerate(((n_in, hid, 3), (hid, hid, 3), (hid, hid, 3), (hid, out_width, 1)), 1):
                shapes[f"{prefix}.res_path.conv_{j}.w"] = (b, a, k, k)
                shapes[f"{prefix}.res_path.conv_{j}.b"] = (b,)
        n_layers_width = out_width
    shapes["blocks.output.conv.w"] = (vocab_size, n_layers_width, 1, 1)
    shapes["blocks.output.conv.b"] = (vocab_size,)
    return shapes


def infer_dalle_arch(state):
    """Best guess of the architecture a DALL-E encoder state_dict was made for (None if the
    keys do not look like one)."""
    try:
        n_hid, input_channels = np.shape(state["blocks.input.w"])[:2]
        vocab_size = np.shape(state["blocks.output.conv.w"])[0]
    except (KeyError, TypeError, ValueError):
        return None
    groups = {k.split(".")[1] for k in state if k.startswith("blocks.group_")}
    blocks = {k.split(".")[2] for k in state if k.startswith("blocks.group_1.block_")}
    return dict(group_count=len(groups), n_hid=int(n_hid), n_blk_per_group=len(blocks),
                input_channels=int(input_channels), vocab_size=int(vocab_size))


def _arch_text(arch):
    return ", ".join(f"{k}={v}" for k, v in arch.items())


def _one_line(err):
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _extract_state(obj):
    """The tensor dict inside what a reader returned: the dict itself, or its
    'model'/'state_dict'/'module' entry; a leading 'module.' is stripped."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module"):
            if key in obj and isinstance(obj[key], dict) and "blocks.input.w" not in obj:
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        return None
    state = {}
    for k, v in obj.items():
        k = str(k)
        state[k[len("module."):] if k.startswith("module.") else k] = v
    return state


def check_dalle_state(state, arch, source):
    """Strict check: the file must hold exactly the architecture's keys with its shapes.
    Returns the state as float32 numpy arrays; raises :class:`DalleWeightsError`."""
    expected = dalle_state_shapes(**arch)
    parts = key_mismatch(expected, state, shapes=False)  # shapes: checked one by one below
    if parts:
        guess = infer_dalle_arch(state)
        hint = (f"the file looks like a DALL-E encoder with {_arch_text(guess)}" if guess
                else "the file does not look like a DALL-E encoder state_dict")
        raise DalleWeightsError(
            f"{source}: not the expected DALL-E encoder weights ({_arch_text(arch)}): "
            f"{', '.join(parts)}; {hint}")
    out = {}
    for key, shape in expected.items():
        value = state[key]
        value = value.numpy() if hasattr(value, "numpy") and callable(value.numpy) else np.asarray(value)
        if tuple(value.shape) != tuple(shape):
            guess = infer_dalle_arch(state)
            hint = f"; the file looks like {_arch_text(guess)}" if guess else ""
            raise DalleWeightsError(
                f"{source}: {key} has shape {list(value.shape)} but the DALL-E encoder "
                f"({_arch_text(arch)}) expects {list(shape)}{hint}")
        if value.dtype.kind != "f":
            raise DalleWeightsError(f"{source}: {key} holds {value.dtype} values, expected floating point")
        if not np.all(np.isfinite(value)):
            raise DalleWeightsError(f"{source}: {key} contains NaN or Inf")
        out[key] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def _read_state(path):
    """The state_dict in a weights file of any format :func:`paddle_cae.io.read_weights`
    recognises from its content (whole pickled modules included). Any failure is one line."""
    try:
        obj = read_weights(path, modules=True)
    except CheckpointError as err:
        detail = _one_line(err)
        if detail.startswith(f"{path}: "):
            detail = detail[len(f"{path}: "):]
        raise DalleWeightsError(f"{path}: cannot read DALL-E encoder weights: {detail}") from None
    if isinstance(obj, TorchModuleStub):
        obj = module_state_dict(obj)
    state = _extract_state(obj)
    if state is None:
        raise DalleWeightsError(f"{path}: holds a {type(obj).__name__}, not a DALL-E encoder state_dict")
    return state


def _cache_path(path, cache_dir):
    directory = Path(cache_dir) if cache_dir is not None else path.parent
    return directory / (path.stem + ".pd")


def load_dalle_encoder(path, cache_dir=None, **arch):
    """Build a :class:`DalleEncoder` (``arch`` overrides the release architecture) and load
    the weights in ``path``: the official ``encoder.pkl`` (pickled module), a ``.pth``
    state dict, a numpy ``.npz`` archive of the same state dict (one array per key, e.g.
    ``np.savez(path, **state_dict)``; read without pickle), or a converted ``.pd``. Keys and shapes are checked strictly, so a missing,
    truncated or wrong file raises :class:`DalleWeightsError` (one line naming the file)
    instead of leaving the tokenizer random.

    Converting a ``.pkl`` writes ``<stem>.pd`` beside it (or into ``cache_dir``); later
    loads read that file while it is newer than the ``.pkl``. A cache that cannot be
    written (read-only folder) is skipped."""
    path = Path(os.fspath(path))
    full_arch = dict(RELEASE_ARCH, **arch)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: DALL-E encoder weights not found (download encoder.pkl from {RELEASE_URL}, "
            "or give a .pth state dict / .npz / converted .pd)")

    state = None
    cache = _cache_path(path, cache_dir) if path.suffix.lower() == ".pkl" else None
    if cache is not None and cache.is_file() and cache.stat().st_mtime >= path.stat().st_mtime:
        try:
            state = check_dalle_state(_read_state(cache), full_arch, cache)
        except DalleWeightsError:
            state = None  # stale or damaged cache: convert again from the .pkl
    if state is None:
        state = check_dalle_state(_read_state(path), full_arch, path)
        if cache is not None:
            _write_cache(cache, state, path)

    model = DalleEncoder(**full_arch)
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
    return model


def _write_cache(cache, state, source):
    try:
        save_checkpoint({"model": state, "meta": {"source": str(source), "kind": "dalle_encoder"}}, cache)
    except OSError:
        pass


# --------------------------------------------------------------------------------- registry
@register_model("tokenizer")
def dalle_encoder(pretrained=None, **kwargs):
    """The released DALL-E encoder (n_hid 256, 2 blocks per group, vocab 8192); with
    ``pretrained`` (encoder.pkl / .pth / .npz / .pd) its weights are loaded and checked."""
    if pretrained:
        return load_dalle_encoder(pretrained, **kwargs)
    return DalleEncoder(**dict(RELEASE_ARCH, **kwargs))


@register_model("tokenizer")
def dalle_encoder_tiny(pretrained=None, **kwargs):
    """A small encoder of the same structure (n_hid 16, 1 block per group, vocab 64) for
    tests and CPU demos."""
    arch = dict(n_hid=16, n_blk_per_group=1, vocab_size=64)
    arch.update(kwargs)
    if pretrained:
        return load_dalle_encoder(pretrained, **arch)
    return DalleEncoder(**dict(RELEASE_ARCH, **arch))
