"""One reader for every weights file the package accepts: :func:`read_weights`.

The format is decided once, from the file's content (its first bytes and, for zip archives, the
member names); the suffix is only a hint for the error message:

=================  ============================================================================
``torch-zip``      ``torch.save`` (torch >= 1.6): a zip archive with ``<prefix>/data.pkl``
``torch-legacy``   ``torch.save`` before 1.6: a pickle stream opening with torch's magic number
``pd``             a pickle of plain data: this package's ``.pd`` files and ``paddle.save``'s
                   ``.pd``/``.pdparams`` (tensors nested in a container are stored by Paddle as
                   ``(name, ndarray)``; those become the arrays)
``npz``            ``numpy.savez``: a zip archive of ``.npy`` members (read without pickle)
=================  ============================================================================

Whatever the format, the result is plain numpy arrays inside dicts/lists/tuples (whole pickled
torch modules, when asked for, come back as inert :class:`~paddle_cae.io.torch_pickle.TorchModuleStub`
trees). Nothing named in a file is imported or run. Every failure is one
:class:`~paddle_cae.io.pd.CheckpointError` line naming the file and what was expected.
"""
import collections
import io
import os
import tarfile
import zipfile

import numpy as np

from .pd import PADDLE_NAME_TABLE, CheckpointError, SizeLimit, parse_pd, read_file_bytes, unwrap_paddle_tensors
from .torch_pickle import (
    TORCH_GLOBALS,
    TORCH_MODULE_GLOBALS,
    TorchModuleStub,
    is_legacy_torch,
    module_state_dict,
    parse_torch_legacy,
    parse_torch_zip,
)

__all__ = ["FORMATS", "TORCH_FORMATS", "detect_format", "load_checkpoint", "read_torch_checkpoint",
           "read_torch_module_state", "read_weights", "read_weights_with_format", "select_state_dict"]

TORCH_ZIP, TORCH_LEGACY, PD, NPZ = "torch-zip", "torch-legacy", "pd", "npz"
FORMATS = (TORCH_ZIP, TORCH_LEGACY, PD, NPZ)
TORCH_FORMATS = (TORCH_ZIP, TORCH_LEGACY)

_DESCRIPTIONS = {
    TORCH_ZIP: "a PyTorch checkpoint (torch.save zip archive)",
    TORCH_LEGACY: "a PyTorch checkpoint (pre-1.6 torch.save stream)",
    PD: "a .pd/.pdparams pickle (Paddle or paddle-cae)",
    NPZ: "a numpy .npz archive",
}
# what a suffix suggests the file was meant to be (used in messages only): (formats, words)
_SUFFIX_HINTS = {".pth": (TORCH_FORMATS, "PyTorch checkpoint"), ".pt": (TORCH_FORMATS, "PyTorch checkpoint"),
                 ".bin": (TORCH_FORMATS, "PyTorch checkpoint"), ".pkl": (TORCH_FORMATS, "pickled PyTorch module"),
                 ".pd": ((PD,), ".pd checkpoint"), ".pdparams": ((PD,), ".pdparams file"),
                 ".npz": ((NPZ,), "numpy .npz archive")}


def _expected_text(formats):
    names = {TORCH_ZIP: "a PyTorch .pth (torch.save)", TORCH_LEGACY: "a PyTorch .pth (torch.save)",
             PD: "a .pd/.pdparams pickle", NPZ: "a numpy .npz archive"}
    return " or ".join(dict.fromkeys(names[f] for f in formats))


def _suffix_hint(source, found=None):
    """' (named like a ...)' when the suffix suggests another format than the one ``found``."""
    formats, words = _SUFFIX_HINTS.get(os.path.splitext(source)[1].lower(), ((), None))
    return f" (named like a {words})" if words and found not in formats else ""


def _zip_format(data, source):
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"{source}: corrupt or truncated zip archive{_suffix_hint(source)} ({err})") from None
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return TORCH_ZIP
    if names and all(n.endswith(".npy") for n in names):
        return NPZ
    raise CheckpointError(
        f"{source}: zip archive holding neither data.pkl (torch.save) nor only .npy arrays (numpy .npz)")


def detect_format(data, source):
    """The format of a file's bytes (one of :data:`FORMATS`), or None when nothing identifies it
    (then only an old-protocol pickle remains possible). Raises CheckpointError for empty files,
    broken zip archives and formats that are recognised but not supported."""
    if not data:
        raise CheckpointError(f"{source}: file is empty")
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _zip_format(data, source)
    if is_legacy_torch(data):
        return TORCH_LEGACY
    if data[:1] == b"\x80":  # pickle protocol >= 2
        return PD
    if len(data) > 512 and tarfile.is_tarfile(io.BytesIO(data)):
        raise CheckpointError(f"{source}: torch <= 0.3 tar checkpoints are not supported; re-save it with torch >= 1.6")
    return None


def _check_npz_sizes(data, source):
    """Refuse an .npz whose members declare more than the file can hold: a compressed member
    expanding past the file's :class:`SizeLimit` (a zip bomb), or an array header whose shape
    needs more bytes than its member has (numpy would allocate the declared size first)."""
    limit = SizeLimit(source, len(data))
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:
                limit.take(info.file_size, f"archive member {info.filename} "
                                           f"({info.file_size:,} bytes uncompressed)")
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(member)
            count = 1
            for dim in shape:
                count *= int(dim)
            if count * dtype.itemsize > info.file_size:
                raise CheckpointError(
                    f"{source}: refused: member {info.filename} declares an array of shape "
                    f"{list(shape)} ({count * dtype.itemsize:,} bytes) in {info.file_size:,} bytes")
    except CheckpointError:
        raise
    except Exception:  # anything unreadable is reported by numpy's own reader below
        return


def _read_npz(data, source):
    _check_npz_sizes(data, source)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return collections.OrderedDict((key, archive[key]) for key in archive.files)
    except Exception as err:  # numpy raises several types on corrupt or object-array members
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{source}: unreadable numpy .npz archive ({type(err).__name__}: {detail})") from None


def _unwrap_nested(obj):
    """Apply :func:`unwrap_paddle_tensors` to every dict nested in dicts (``paddle.save`` of
    ``{"model": state_dict, ...}`` stores the tensors as ``(name, ndarray)``)."""
    if isinstance(obj, dict):
        obj = unwrap_paddle_tensors(obj)
        for key, value in obj.items():
            if isinstance(value, dict):
                obj[key] = _unwrap_nested(value)
    return obj


def read_weights_with_format(path, formats=FORMATS, modules=False):
    """(object, format) of the weights file ``path``; see :func:`read_weights`."""
    source, data = read_file_bytes(path)
    fmt = detect_format(data, source)
    if fmt is None and PD in formats:
        fmt = PD  # an old-protocol pickle, or garbage the unpickler names
    if fmt not in formats:
        if fmt == PD:  # a pickle that is unsafe or broken is reported as such first
            parse_pd(data, source)
        found = _DESCRIPTIONS.get(fmt, "neither a zip archive nor a pickle")
        hint = ""
        if PD in formats and fmt in TORCH_FORMATS:
            hint = "; convert it with `python -m paddle_cae.convert`"
        raise CheckpointError(
            f"{source}: {found}{_suffix_hint(source, fmt)}, expected {_expected_text(formats)}{hint}")
    if fmt == TORCH_ZIP:
        obj = parse_torch_zip(data, source, TORCH_MODULE_GLOBALS if modules else TORCH_GLOBALS)
    elif fmt == TORCH_LEGACY:
        obj = parse_torch_legacy(data, source, TORCH_MODULE_GLOBALS if modules else TORCH_GLOBALS)
    elif fmt == NPZ:
        obj = _read_npz(data, source)
    else:
        obj = _unwrap_nested(parse_pd(data, source))
    return obj, fmt


def read_weights(path, formats=FORMATS, modules=False):
    """Read a weights or checkpoint file of any supported format (torch zip, torch legacy, .pd /
    .pdparams pickle, numpy .npz), decided from its content; ``formats`` limits what the caller
    accepts (another format is a one-line error saying what was found and what was expected).

    Returns the saved object with every tensor as a numpy array (bfloat16 widened to float32).
    Whole pickled torch modules are refused unless ``modules`` is true; then allow-listed module
    classes come back as inert :class:`TorchModuleStub` trees (see :func:`module_state_dict`)."""
    return read_weights_with_format(path, formats, modules)[0]


# ----------------------------------------------------------------------------- named readers
def load_checkpoint(path):
    """Read a ``.pd`` file of this package or a ``.pdparams``/``.pd`` written by ``paddle.save``,
    without executing anything from the file. Returns the plain objects.

    Raises :class:`CheckpointError` for missing, truncated, corrupt, unsafe or non-.pd files."""
    return read_weights(path, formats=(PD,))


def read_torch_checkpoint(path, allow_modules=False):
    """Read a ``torch.save`` file (zip or legacy format) without torch.

    Returns the saved object with every tensor as a contiguous numpy array (bfloat16 widened to
    float32), OrderedDicts kept, argparse Namespaces as dicts and devices as strings. Whole
    pickled modules are refused unless ``allow_modules`` is true, in which case allow-listed
    module classes come back as :class:`TorchModuleStub` objects."""
    return read_weights(path, formats=TORCH_FORMATS, modules=allow_modules)


def read_torch_module_state(path):
    """Read a ``torch.save`` of a whole module (e.g. DALL-E's ``encoder.pkl``) and return its flat
    state_dict (``blocks.input.w``, ``blocks.group_1.block_1.res_path.conv_1.w``, ...).

    Only allow-listed module classes are rebuilt, as inert stubs. A file holding a state_dict
    instead of a module is accepted too (its state_dict is returned via :func:`select_state_dict`)."""
    obj = read_torch_checkpoint(path, allow_modules=True)
    if isinstance(obj, TorchModuleStub):
        return module_state_dict(obj)
    return select_state_dict(obj, source=os.fspath(path))


# ------------------------------------------------------------------------ state_dict selection
_STATE_KEYS = ("model", "module", "state_dict", "model_ema")


def _is_array_dict(obj):
    obj = unwrap_paddle_tensors(obj)
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(v, np.ndarray) for k, v in obj.items() if k != PADDLE_NAME_TABLE)


def key_mismatch(expected_shapes, state, shapes=True):
    """How ``state`` (key -> array) differs from ``expected_shapes`` (key -> shape): a list of
    phrases, empty when every key is there (with its shape, unless ``shapes`` is False):
    ``missing 2 (e.g. k)``, ``unexpected 1 (e.g. k)``,
    ``1 of another shape (e.g. k: [..] in the file, [..] expected)``."""
    missing = [k for k in expected_shapes if k not in state]
    unexpected = [k for k in state if k not in expected_shapes]
    wrong = [k for k in expected_shapes if shapes and k in state
             and tuple(np.shape(state[k])) != tuple(expected_shapes[k])]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} of another shape (e.g. {k}: {list(np.shape(state[k]))} in the "
                     f"file, {list(expected_shapes[k])} expected)")
    return parts


def select_state_dict(obj, key=None, source="checkpoint"):
    """Pick the state_dict out of a loaded checkpoint: ``obj[key]`` if ``key`` is given, else the
    first of ``model``/``module``/``state_dict``/``model_ema`` present, else ``obj`` itself if it
    is already a flat dict of arrays. A leading ``module.`` (DataParallel) is stripped."""
    if isinstance(obj, TorchModuleStub):
        state = module_state_dict(obj)
    elif not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict checkpoint, found {type(obj).__name__}")
    elif key is not None:
        if key not in obj:
            raise CheckpointError(f"{source}: no entry {key!r}; it has {sorted(map(str, obj))}")
        state = obj[key]
    else:
        found = next((k for k in _STATE_KEYS if k in obj and isinstance(obj[k], (dict, TorchModuleStub))), None)
        if found is not None:
            state = obj[found]
        elif _is_array_dict(obj):
            state = obj
        else:
            raise CheckpointError(
                f"{source}: cannot find a state_dict (looked for {', '.join(_STATE_KEYS)}); "
                f"it has {sorted(map(str, obj))}"
            )
    if isinstance(state, TorchModuleStub):
        state = module_state_dict(state)
    state = unwrap_paddle_tensors(state)
    if isinstance(state, dict) and PADDLE_NAME_TABLE in state:
        state = collections.OrderedDict((k, v) for k, v in state.items() if k != PADDLE_NAME_TABLE)
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: entry {key!r} is a {type(state).__name__}, not a state_dict")
    if state and all(str(k).startswith("module.") for k in state):
        state = collections.OrderedDict((k[len("module."):], v) for k, v in state.items())
    return state
