"""Official PyTorch checkpoints (``.pth``) and the DALL-E ``encoder.pkl`` -> Paddle, without torch.

Reading
    ``torch.save`` files are pickles whose tensors live outside the pickle: in the zip format
    (torch >= 1.6) ``<prefix>/data.pkl`` refers to raw storages ``<prefix>/data/<key>`` through
    persistent ids; in the older single-stream format the storages follow the pickle. Tensors are
    rebuilt by ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``.
    We re-implement just enough of that to get numpy arrays back, with an unpickler that resolves
    only an allow-list of globals: nothing named in the file is imported or run. Whole pickled
    modules (DALL-E's ``encoder.pkl``) are rebuilt as inert stubs of allow-listed module classes,
    from which the state_dict is collected.

Converting
    :func:`convert_state_dict` maps official keys onto a Paddle model's ``state_dict`` names and
    layouts (Linear weights transposed, decided from the model's layer types), and reports what
    was loaded, missing, unused and shape-mismatched.

Command line: ``python -m paddle_cae.convert SRC.pth DST.pd --model NAME``.
"""
import argparse
import collections
import hashlib
import io
import os
import pickle
import sys
import tarfile
import zipfile

import numpy as np

from paddle_cae.runtime.checkpoint import (
    SAFE_DATA_GLOBALS,
    CheckpointError,
    describe_read_error,
    normalise_global,
    read_checkpoint_bytes,
    save_checkpoint,
)

__all__ = [
    "CheckpointError",
    "read_torch_checkpoint",
    "read_torch_module_state",
    "module_state_dict",
    "select_state_dict",
    "unwrap_paddle_tensors",
    "linear_weight_names",
    "convert_state_dict",
    "TorchModuleStub",
    "main",
]

# ----------------------------------------------------------------------------------------------
# storage dtypes
# ----------------------------------------------------------------------------------------------
# torch storage class name -> numpy dtype of one element. BFloat16 has no numpy dtype: its raw
# 16-bit words are read as uint16 and widened to float32 afterwards.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
    # raw bytes; torch >= 2 may name it when a storage is saved on its own
    "UntypedStorage": np.uint8,
}

# torch.<dtype> objects can appear as plain values (e.g. in metadata); keep them as names
_TORCH_DTYPE_NAMES = (
    "float32", "float", "float64", "double", "float16", "half", "bfloat16", "int64", "long",
    "int32", "int", "int16", "short", "int8", "uint8", "bool", "complex64", "complex128",
)


class _StorageType:
    """Stands for a torch storage class named in a persistent id."""

    def __init__(self, name):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])
        self.is_bfloat16 = name == "BFloat16Storage"

    def __repr__(self):
        return f"torch.{self.name}"


class _TypedStorageRef:
    """A storage named in the pickle; its bytes are attached when read (zip: at once; legacy
    format: after the whole pickle, because there the raw data follows it)."""

    def __init__(self, storage_type, key, numel):
        self.storage_type = storage_type
        self.key = key
        self.numel = numel
        self.array = None  # 1-D numpy array of the storage's elements


class _PendingTensor:
    """A tensor whose storage may not be read yet; replaced by a numpy array afterwards."""

    def __init__(self, storage, offset, size, stride):
        self.storage = storage
        self.offset = int(offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)


class TorchDevice(str):
    """What a pickled ``torch.device`` becomes: its name as a string ('cpu', 'cuda:0')."""

    def __new__(cls, kind="cpu", index=None):
        return super().__new__(cls, str(kind) if index is None else f"{kind}:{index}")


class TorchNamespace(dict):
    """A pickled ``argparse.Namespace`` (training args in official checkpoints), kept as a dict.
    Attribute access is offered for convenience; nothing else of argparse is involved."""

    def __setstate__(self, state):
        if isinstance(state, tuple):  # (dict_state, slot_state)
            state = state[0] or {}
        self.update(state or {})

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class TorchModuleStub:
    """Inert stand-in for a pickled ``torch.nn.Module`` subclass on the allow-list.

    Unpickling only stores the pickled attributes (``state``); no method of the original class
    exists here, so nothing from the file can run. ``torch_class`` names the original class."""

    torch_class = "?"

    def __init__(self, *args, **kwargs):  # called only if a pickle REDUCEs the class
        self.state = {"__init_args__": args, **kwargs}

    def __setstate__(self, state):
        if isinstance(state, tuple):  # (dict_state, slot_state) of classes with __slots__
            merged = {}
            for part in state:
                if isinstance(part, dict):
                    merged.update(part)
            state = merged
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected pickled state of {self.torch_class}")
        self.state = dict(state)

    def __repr__(self):
        return f"<{self.torch_class} stub>"


# module classes that may be rebuilt as stubs (only when reading whole pickled modules)
_ALLOWED_MODULE_CLASSES = (
    ("torch.nn.modules.module", "Module"),
    ("torch.nn.modules.container", "Sequential"),
    ("torch.nn.modules.container", "ModuleList"),
    ("torch.nn.modules.container", "ModuleDict"),
    ("torch.nn.modules.container", "ParameterList"),
    ("torch.nn.modules.container", "ParameterDict"),
    ("torch.nn.modules.activation", "ReLU"),
    ("torch.nn.modules.activation", "GELU"),
    ("torch.nn.modules.activation", "Sigmoid"),
    ("torch.nn.modules.activation", "Tanh"),
    ("torch.nn.modules.pooling", "MaxPool2d"),
    ("torch.nn.modules.pooling", "AvgPool2d"),
    ("torch.nn.modules.linear", "Identity"),
    ("torch.nn.modules.linear", "Linear"),
    ("torch.nn.modules.conv", "Conv2d"),
    ("torch.nn.modules.conv", "ConvTranspose2d"),
    ("torch.nn.modules.normalization", "LayerNorm"),
    ("torch.nn.modules.normalization", "GroupNorm"),
    ("torch.nn.modules.batchnorm", "BatchNorm2d"),
    ("torch.nn.modules.dropout", "Dropout"),
    ("torch.nn.modules.upsampling", "Upsample"),
    ("torch.nn.modules.flatten", "Flatten"),
    ("torch.nn", "Identity"),
    ("dall_e.encoder", "Encoder"),
    ("dall_e.encoder", "EncoderBlock"),
    ("dall_e.decoder", "Decoder"),
    ("dall_e.decoder", "DecoderBlock"),
    ("dall_e.utils", "Conv2d"),
)


def _make_stub_class(module, name):
    return type(name, (TorchModuleStub,), {"torch_class": f"{module}.{name}", "__module__": __name__})


_MODULE_STUBS = {key: _make_stub_class(*key) for key in _ALLOWED_MODULE_CLASSES}


# ----------------------------------------------------------------------------------------------
# tensor rebuild functions (named by the pickle, implemented here)
# ----------------------------------------------------------------------------------------------
def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, _TypedStorageRef):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state=None):
    # func was itself resolved through the allow-list; the subclass (e.g. Parameter) is dropped
    return func(*args)


def _parameter_stub(data=None, requires_grad=True):
    return data


def _torch_size(dims=()):
    return tuple(int(d) for d in dims)


_TORCH_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.nn.parameter", "Parameter"): _parameter_stub,
    ("torch", "Tensor"): _parameter_stub,
    ("torch", "device"): TorchDevice,
    ("torch", "Size"): _torch_size,
    ("argparse", "Namespace"): TorchNamespace,
}
for _name in _STORAGE_DTYPES:
    _TORCH_GLOBALS[("torch", _name)] = _StorageType(_name)
    _TORCH_GLOBALS[("torch.storage", _name)] = _TORCH_GLOBALS[("torch", _name)]
for _name in _TORCH_DTYPE_NAMES:
    _TORCH_GLOBALS[("torch", _name)] = f"torch.{_name}"
_TORCH_GLOBALS.update(SAFE_DATA_GLOBALS)

_TORCH_MODULE_GLOBALS = dict(_TORCH_GLOBALS)
_TORCH_MODULE_GLOBALS.update(_MODULE_STUBS)


class _TorchUnpickler(pickle.Unpickler):
    def __init__(self, file, source, allowed, storages):
        super().__init__(file)
        self.source = source
        self.allowed = allowed
        self.storages = storages  # key -> _TypedStorageRef, shared by all tensors of one file

    def find_class(self, module, name):
        key = normalise_global(module, name)
        if key in self.allowed:
            return self.allowed[key]
        hint = ""
        if key in _MODULE_STUBS:
            hint = " (a pickled whole module: use read_torch_module_state)"
        raise CheckpointError(
            f"{self.source}: refused to load global '{key[0]}.{key[1]}': only tensors, plain "
            f"containers and allow-listed module classes are accepted{hint}"
        )

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise CheckpointError(f"{self.source}: unknown persistent id {str(pid)[:60]!r}")
        # zip: ('storage', type, key, location, numel)
        # legacy: ('storage', type, root_key, location, numel, view_metadata)
        if len(pid) not in (5, 6):
            raise CheckpointError(f"{self.source}: malformed storage id {str(pid)[:60]!r}")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if len(pid) == 6 and pid[5] is not None:
            raise CheckpointError(f"{self.source}: storage views of the pre-1.0 torch format are not supported")
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self.source}: storage {key!r} has unknown type {storage_type!r}")
        if not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"{self.source}: storage {key!r} has invalid size {numel!r}")
        ref = self.storages.get(key)
        if ref is None:
            ref = self.storages[key] = _TypedStorageRef(storage_type, key, numel)
        return ref


def _unpickle(data, source, allowed, storages):
    try:
        return _TorchUnpickler(io.BytesIO(data), source, allowed, storages).load()
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(describe_read_error(source, err)) from None


def _attach_storage(ref, raw, source, little_endian=True):
    dtype = ref.storage_type.dtype
    if not little_endian:
        dtype = dtype.newbyteorder(">")
    if len(raw) < ref.numel * dtype.itemsize:
        raise CheckpointError(
            f"{source}: storage {ref.key!r} holds {len(raw)} bytes, expected "
            f"{ref.numel * dtype.itemsize} (truncated file?)"
        )
    array = np.frombuffer(raw, dtype=dtype, count=ref.numel)
    if not little_endian:
        array = array.astype(dtype.newbyteorder("="))
    if ref.storage_type.is_bfloat16:
        # bfloat16 is the upper half of a float32: widen the 16-bit words exactly
        array = (array.astype(np.uint32) << 16).view(np.float32)
    ref.array = array


def _materialise(tensor, source):
    ref = tensor.storage
    if ref.array is None:
        raise CheckpointError(f"{source}: storage {ref.key!r} is referenced but missing from the file")
    size, stride, offset = tensor.size, tensor.stride, tensor.offset
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"{source}: tensor with invalid layout size={size} stride={stride} offset={offset}")
    if 0 in size:
        return np.zeros(size, dtype=ref.array.dtype)
    # the last element touched must lie inside the storage; as_strided does not check
    last = offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= ref.array.size:
        raise CheckpointError(
            f"{source}: tensor reads element {last} of storage {ref.key!r} which has {ref.array.size}"
        )
    base = ref.array[offset:]
    item = base.itemsize
    view = np.lib.stride_tricks.as_strided(base, shape=size, strides=[st * item for st in stride], writeable=False)
    return np.array(view, order="C", copy=True)  # (ascontiguousarray would turn 0-d into 1-d)


def _resolve(obj, source, memo=None):
    """Replace every pending tensor inside ``obj`` (containers and module stubs) by its array."""
    if memo is None:
        memo = {}
    oid = id(obj)
    if oid in memo:
        return memo[oid]
    if isinstance(obj, _PendingTensor):
        result = _materialise(obj, source)
    elif isinstance(obj, dict):
        for k in list(obj.keys()):
            obj[k] = _resolve(obj[k], source, memo)
        result = obj
    elif isinstance(obj, list):
        obj[:] = [_resolve(v, source, memo) for v in obj]
        result = obj
    elif isinstance(obj, tuple):
        result = tuple(_resolve(v, source, memo) for v in obj)
    elif isinstance(obj, TorchModuleStub):
        obj.state = _resolve(obj.state, source, memo)
        result = obj
    else:
        result = obj
    memo[oid] = result
    return result


# ----------------------------------------------------------------------------------------------
# file formats
# ----------------------------------------------------------------------------------------------
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _read_zip_checkpoint(data, source, allowed):
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"{source}: corrupt or truncated zip archive ({err})") from None
    pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if not pickles:
        raise CheckpointError(f"{source}: zip archive without data.pkl (not a torch.save file)")
    pkl_name = min(pickles, key=len)
    prefix = pkl_name[: -len("data.pkl")]

    def read_member(name):
        try:
            return archive.read(name)
        except KeyError:
            return None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:  # CRC / truncation
            raise CheckpointError(f"{source}: corrupt archive member {name} ({err})") from None

    byteorder = read_member(prefix + "byteorder")
    little = byteorder is None or byteorder.strip() == b"little"
    storages = {}
    obj = _unpickle(read_member(pkl_name), source, allowed, storages)
    for key, ref in storages.items():
        raw = read_member(f"{prefix}data/{key}")
        if raw is None:
            raise CheckpointError(f"{source}: storage data/{key} is missing from the archive")
        _attach_storage(ref, raw, source, little)
    return _resolve(obj, source)


def _read_legacy_checkpoint(data, source, allowed):
    """torch 1.0-1.5 format: magic, protocol, sys_info, main pickle, list of storage keys, then
    each storage as <int64 element count><raw bytes> in that order."""
    stream = io.BytesIO(data)

    def next_pickle(storages):
        try:
            return _TorchUnpickler(stream, source, allowed, storages).load()
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(describe_read_error(source, err)) from None

    no_storages = {}
    if next_pickle(no_storages) != _LEGACY_MAGIC:
        raise CheckpointError(f"{source}: not a torch checkpoint (no zip archive, no legacy magic number)")
    protocol = next_pickle(no_storages)
    if protocol != _LEGACY_PROTOCOL:
        raise CheckpointError(f"{source}: unsupported legacy torch protocol {protocol!r}")
    sys_info = next_pickle(no_storages)
    little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    storages = {}
    obj = next_pickle(storages)
    keys = next_pickle(no_storages)
    if not isinstance(keys, list):
        raise CheckpointError(f"{source}: malformed legacy checkpoint (storage key list missing)")
    for key in keys:
        ref = storages.get(str(key))
        header = stream.read(8)
        if len(header) < 8:
            raise CheckpointError(f"{source}: file ends inside storage {key!r} (truncated file?)")
        numel = int.from_bytes(header, "little" if little else "big", signed=True)
        if ref is None:
            raise CheckpointError(f"{source}: legacy storage {key!r} is not referenced by the pickle")
        nbytes = numel * ref.storage_type.dtype.itemsize
        raw = stream.read(nbytes)
        if numel < ref.numel or len(raw) < nbytes:
            raise CheckpointError(f"{source}: storage {key!r} is shorter than declared (truncated file?)")
        ref.numel = numel
        _attach_storage(ref, raw, source, little)
    return _resolve(obj, source)


def _read_any(path, allowed):
    source, data = read_checkpoint_bytes(path)
    if not data:
        raise CheckpointError(f"{source}: file is empty")
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _read_zip_checkpoint(data, source, allowed)
    if data[:1] == b"\x80":  # a pickle stream: the pre-1.6 single-file format
        return _read_legacy_checkpoint(data, source, allowed)
    if len(data) > 512 and tarfile.is_tarfile(source):
        raise CheckpointError(f"{source}: torch <= 0.3 tar checkpoints are not supported; re-save it with torch >= 1.6")
    raise CheckpointError(f"{source}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")


def read_torch_checkpoint(path, allow_modules=False):
    """Read a ``torch.save`` file without torch.

    Returns the saved object with every tensor as a contiguous numpy array (bfloat16 widened to
    float32), OrderedDicts kept, argparse Namespaces as :class:`TorchNamespace` dicts and
    devices as strings. Whole pickled modules are refused unless ``allow_modules`` is true, in
    which case allow-listed module classes come back as :class:`TorchModuleStub` objects.

    Raises :class:`CheckpointError` (one line, naming the file) for unreadable or unsafe files."""
    allowed = _TORCH_MODULE_GLOBALS if allow_modules else _TORCH_GLOBALS
    return _read_any(path, allowed)


def module_state_dict(module, prefix=""):
    """The flat state_dict (``name -> array``) of a :class:`TorchModuleStub` tree, walking
    ``_parameters``, persistent ``_buffers`` and ``_modules`` the way ``nn.Module.state_dict``
    does."""
    out = collections.OrderedDict()
    state = module.state
    non_persistent = state.get("_non_persistent_buffers_set") or ()
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in non_persistent:
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, TorchModuleStub):
            raise CheckpointError(f"sub-module {prefix + name!r} is not a module ({type(child).__name__})")
        out.update(module_state_dict(child, prefix + name + "."))
    return out


def read_torch_module_state(path):
    """Read a ``torch.save`` of a whole module (e.g. DALL-E's ``encoder.pkl``) and return its flat
    state_dict (``blocks.input.w``, ``blocks.group_1.block_1.res_path.conv_1.w``, ...).

    Only allow-listed module classes are rebuilt, as inert stubs. A file holding a state_dict
    instead of a module is accepted too (its state_dict is returned via :func:`select_state_dict`)."""
    obj = read_torch_checkpoint(path, allow_modules=True)
    if isinstance(obj, TorchModuleStub):
        return module_state_dict(obj)
    return select_state_dict(obj, source=os.fspath(path))


# ----------------------------------------------------------------------------------------------
# state dict selection and conversion
# ----------------------------------------------------------------------------------------------
_STATE_KEYS = ("model", "module", "state_dict", "model_ema")


_PADDLE_NAME_TABLE = "StructuredToParameterName@@"


def _is_saved_tensor(value):
    """``paddle.save`` stores a tensor inside a nested container as ``(name, ndarray)``."""
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) \
        and isinstance(value[1], np.ndarray)


def unwrap_paddle_tensors(state):
    """A state dict written by ``paddle.save`` inside another dict (``{"model": sd}``): every
    ``(name, ndarray)`` entry becomes its array, Paddle's name table is dropped. Other dicts
    are returned unchanged."""
    if not isinstance(state, dict) or not any(_is_saved_tensor(v) for v in state.values()):
        return state
    return collections.OrderedDict((k, v[1] if _is_saved_tensor(v) else v) for k, v in state.items()
                                   if k != _PADDLE_NAME_TABLE)


def _is_array_dict(obj):
    obj = unwrap_paddle_tensors(obj)
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(v, np.ndarray) for k, v in obj.items() if k != _PADDLE_NAME_TABLE)


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
    if isinstance(state, dict) and _PADDLE_NAME_TABLE in state:
        state = collections.OrderedDict((k, v) for k, v in state.items() if k != _PADDLE_NAME_TABLE)
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: entry {key!r} is a {type(state).__name__}, not a state_dict")
    if state and all(str(k).startswith("module.") for k in state):
        state = collections.OrderedDict((k[len("module."):], v) for k, v in state.items())
    return state


def linear_weight_names(model):
    """Structured names (as in ``model.state_dict()``) of every ``paddle.nn.Linear`` weight.

    Paddle stores Linear weights as [in, out], PyTorch as [out, in], so exactly these are
    transposed on conversion; conv / conv-transpose weights share PyTorch's layout."""
    import paddle

    names = set()
    for prefix, layer in model.named_sublayers(include_self=True):
        if isinstance(layer, paddle.nn.Linear):
            names.add(f"{prefix}.weight" if prefix else "weight")
    return names


# buffers a model recomputes from its configuration instead of loading them
_RECOMPUTED_SUFFIXES = ("relative_position_index",)
_DROPPED_SUFFIXES = ("relative_position_index", "num_batches_tracked")
_BATCHNORM_RENAMES = (("running_mean", "_mean"), ("running_var", "_variance"))


def _apply_rename(rename, key):
    if rename is None:
        return key
    if callable(rename):
        return rename(key)
    if isinstance(rename, dict):
        return rename.get(key, key)
    raise TypeError(f"rename must be a callable or a dict, got {type(rename).__name__}")


def convert_state_dict(official_sd, model, rename=None, transpose_linear=True):
    """Map an official PyTorch state_dict onto ``model`` (a paddle Layer).

    ``rename`` (callable ``key -> new key or None`` or a dict) turns official names into the
    model's; by default ``model.official_key_map`` is used if the model defines it. Keys mapped
    to None are dropped. ``relative_position_index`` and ``num_batches_tracked`` are dropped,
    BatchNorm ``running_mean``/``running_var`` become ``_mean``/``_variance``, every weight of a
    ``paddle.nn.Linear`` is transposed, floats become float32.

    Returns ``(paddle_state, report)``: ``paddle_state`` maps model keys to numpy arrays ready for
    ``model.set_state_dict``; ``report`` has ``loaded``, ``missing`` (model keys with no source),
    ``unused`` (source keys not used), ``mismatched`` (``(key, source_shape, model_shape)``, not
    put in ``paddle_state``) and ``dropped`` (source keys dropped on purpose).

    ``transpose_linear=False`` is for sources already in Paddle's layout (``.pd`` files), which
    only need the renaming and the checks."""
    if rename is None:
        rename = getattr(model, "official_key_map", None)
    model_state = model.state_dict()
    model_shapes = {k: tuple(int(d) for d in v.shape) for k, v in model_state.items()}
    linear = linear_weight_names(model)

    paddle_state = collections.OrderedDict()
    report = {"loaded": [], "missing": [], "unused": [], "mismatched": [], "dropped": []}
    used_targets = {}
    for src_key, value in official_sd.items():
        if str(src_key).endswith(_DROPPED_SUFFIXES):
            report["dropped"].append(src_key)
            continue
        key = _apply_rename(rename, src_key)
        if key is None:
            report["dropped"].append(src_key)
            continue
        for old, new in _BATCHNORM_RENAMES:
            if key.endswith("." + old) and key not in model_shapes:
                key = key[: -len(old)] + new
        if key not in model_shapes:
            report["unused"].append(src_key)
            continue
        if key in used_targets:
            raise ValueError(f"official keys {used_targets[key]!r} and {src_key!r} both map to model key {key!r}")
        used_targets[key] = src_key
        array = np.asarray(value)
        source_shape = tuple(array.shape)
        if transpose_linear and key in linear and array.ndim == 2:
            array = array.T
        if tuple(array.shape) != model_shapes[key]:
            report["mismatched"].append((key, source_shape, model_shapes[key]))
            continue
        if array.dtype.kind == "f" and array.dtype != np.float32:
            array = array.astype(np.float32)
        paddle_state[key] = np.array(array, order="C", copy=True)
        report["loaded"].append(key)
    mismatched_keys = {m[0] for m in report["mismatched"]}
    report["missing"] = [
        k for k in model_state
        if k not in paddle_state and k not in mismatched_keys and not k.endswith(_RECOMPUTED_SUFFIXES)
    ]
    return paddle_state, report


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m paddle_cae.convert",
        description=(
            "Convert an official PyTorch checkpoint (MAE/CAE/BootMAE .pth, or DALL-E encoder.pkl) "
            "into a paddle-cae .pd file, without PyTorch. Nothing in the source file is executed: "
            "only tensors, plain containers and known module classes are accepted."
        ),
        epilog=(
            "Examples:\n"
            "  python -m paddle_cae.convert mae_pretrain_vit_base.pth mae_vit_b.pd --model vit_base_patch16\n"
            "  python -m paddle_cae.convert BootMAE_Base_800_PT.pth ema.pd --model bootmae_base --key model_ema\n"
            "  python -m paddle_cae.convert encoder.pkl dalle_encoder.pd --model dalle_encoder\n"
            "The .pd holds {'model': state_dict, 'converted_from': {...}} and is read by\n"
            "paddle_cae.runtime.checkpoint.load_checkpoint (or paddle.load)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", help="PyTorch checkpoint to read (.pth zip or legacy pickle, or a pickled module)")
    parser.add_argument("dst", help="output .pd file (written atomically; not created on error)")
    parser.add_argument("--model", required=True,
                        help="registered paddle-cae model name the weights are for (e.g. vit_base_patch16)")
    parser.add_argument("--model_args", default=None, metavar="JSON",
                        help="constructor arguments of --model as JSON, for small variants and the "
                             "test fixtures, e.g. '{\"embed_dim\": 64, \"depth\": 2, \"num_heads\": 4}'")
    parser.add_argument("--key", default=None,
                        help="entry of the checkpoint holding the weights: model, model_ema, module, "
                             "state_dict, teacher ... (default: the first of model/module/state_dict/model_ema)")
    parser.add_argument("--encoder_only", action="store_true",
                        help="keep only the encoder of a pretraining checkpoint: an 'encoder.' prefix is "
                             "stripped, other source keys are dropped, missing head keys are expected")
    parser.add_argument("--strict", action="store_true",
                        help="fail (write nothing) if any model key is missing or any shape mismatches")
    return parser


def _encoder_only_rename(state, base_rename):
    has_encoder_prefix = any(k.startswith("encoder.") for k in state)

    def rename(key):
        if has_encoder_prefix:
            if not key.startswith("encoder."):
                return None
            key = key[len("encoder."):]
        return _apply_rename(base_rename, key) if base_rename is not None else key

    return rename


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _print_report(report, out):
    print(f"loaded {len(report['loaded'])}, missing {len(report['missing'])}, "
          f"unused {len(report['unused'])}, mismatched {len(report['mismatched'])}, "
          f"dropped {len(report['dropped'])}", file=out)
    for title in ("missing", "unused"):
        if report[title]:
            print(f"{title} keys:", file=out)
            for k in report[title]:
                print(f"  {k}", file=out)
    if report["mismatched"]:
        print("shape mismatches (source -> model):", file=out)
        for k, src, dst in report["mismatched"]:
            print(f"  {k}: {list(src)} -> {list(dst)}", file=out)


def run(args, out=None):
    """Convert as the command line asks; prints the report to ``out`` (default stdout)."""
    from paddle_cae.models import create_model

    out = sys.stdout if out is None else out
    src = os.fspath(args.src)
    obj = read_torch_checkpoint(src, allow_modules=True)
    state = select_state_dict(obj, args.key, source=src)
    model_args = getattr(args, "model_args", None) or {}
    if isinstance(model_args, str):
        import json

        try:
            model_args = json.loads(model_args)
        except json.JSONDecodeError as err:
            raise ValueError(f"--model_args is not valid JSON ({err.msg}): {model_args}") from None
        if not isinstance(model_args, dict):
            raise ValueError(f"--model_args must be a JSON object of constructor arguments, got {args.model_args}")
    try:
        model = create_model(args.model, **model_args)
    except KeyError as err:
        raise CheckpointError(f"--model {args.model}: {err.args[0]}") from None
    except TypeError as err:
        raise ValueError(f"--model_args for {args.model}: {str(err).splitlines()[0]}") from None
    base_rename = getattr(model, "official_key_map", None)
    rename = _encoder_only_rename(state, base_rename) if args.encoder_only else base_rename
    paddle_state, report = convert_state_dict(state, model, rename=rename)
    if args.encoder_only:
        # a backbone export from a pretraining checkpoint has no classifier head to load
        report["missing"] = [k for k in report["missing"] if not k.split(".")[0] in ("head", "fc_norm")]
    _print_report(report, out)
    if args.strict and (report["missing"] or report["mismatched"]):
        raise CheckpointError(
            f"{src}: --strict: {len(report['missing'])} missing and {len(report['mismatched'])} "
            f"mismatched keys for model {args.model}; nothing written"
        )
    if not paddle_state:
        raise CheckpointError(
            f"{src}: no tensor could be loaded into model {args.model} ({len(report['unused'])} unused, "
            f"{len(report['mismatched'])} shape-mismatched keys); nothing written"
        )
    meta = {
        "source": os.path.basename(src),
        "sha256": _sha256(src),
        "model": args.model,
        "model_args": dict(model_args),
        "key": args.key,
        "encoder_only": bool(args.encoder_only),
        "unused": list(report["unused"]),
        "missing": list(report["missing"]),
    }
    save_checkpoint({"model": paddle_state, "converted_from": meta}, args.dst)
    print(f"wrote {args.dst} ({len(paddle_state)} tensors)", file=out)
    return 0


def main(argv=None):
    args = _build_parser().parse_args(argv)
    try:
        return run(args)
    except CheckpointError as err:  # already one line naming the file
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"error: converting {args.src} -> {args.dst}: {detail}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
