"""``torch.save`` files read without torch: the zip format, the pre-1.6 single-stream format and
whole pickled modules (DALL-E's ``encoder.pkl``).

``torch.save`` files are pickles whose tensors live outside the pickle: in the zip format
(torch >= 1.6) ``<prefix>/data.pkl`` refers to raw storages ``<prefix>/data/<key>`` through
persistent ids; in the older single-stream format the storages follow the pickle. Tensors are
rebuilt by ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``.
We re-implement just enough of that to get numpy arrays back, with an unpickler that resolves
only an allow-list of globals: nothing named in the file is imported or run. Whole pickled
modules are rebuilt as inert stubs of allow-listed module classes, from which the state_dict is
collected (:func:`module_state_dict`).

The functions here parse bytes already read; files are opened by :mod:`paddle_cae.io.weights`,
which decides the format.
"""
import collections
import io
import pickle
import zipfile

import numpy as np

from .pd import SAFE_DATA_GLOBALS, CheckpointError, SafeUnpickler, SizeLimit, unpickle_from

__all__ = ["TorchDevice", "TorchModuleStub", "TorchNamespace", "is_legacy_torch", "module_state_dict",
           "parse_torch_legacy", "parse_torch_zip", "TORCH_GLOBALS", "TORCH_MODULE_GLOBALS"]

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


TORCH_GLOBALS = {
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
    TORCH_GLOBALS[("torch", _name)] = _StorageType(_name)
    TORCH_GLOBALS[("torch.storage", _name)] = TORCH_GLOBALS[("torch", _name)]
for _name in _TORCH_DTYPE_NAMES:
    TORCH_GLOBALS[("torch", _name)] = f"torch.{_name}"
TORCH_GLOBALS.update(SAFE_DATA_GLOBALS)

TORCH_MODULE_GLOBALS = dict(TORCH_GLOBALS)
TORCH_MODULE_GLOBALS.update(_MODULE_STUBS)


class _TorchUnpickler(SafeUnpickler):
    accepted = "only tensors, plain containers and allow-listed module classes are accepted"

    def __init__(self, file, source, allowed, storages, limit=None):
        super().__init__(file, source, allowed, limit)
        self.storages = storages  # key -> _TypedStorageRef, shared by all tensors of one file

    def refusal_hint(self, key):
        return " (a pickled whole module: use read_torch_module_state)" if key in _MODULE_STUBS else ""

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


def _materialise(tensor, source, limit):
    ref = tensor.storage
    if ref.array is None:
        raise CheckpointError(f"{source}: storage {ref.key!r} is referenced but missing from the file")
    size, stride, offset = tensor.size, tensor.stride, tensor.offset
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"{source}: tensor with invalid layout size={size} stride={stride} offset={offset}")
    # a size with stride 0 (or many tensors over one storage) would make a small file expand
    # into any amount of memory: every copy counts against the file's limit
    count = 1
    for n in size:
        count *= n
    limit.take(count * ref.array.itemsize, f"tensor of size {list(size)} over storage {ref.key!r}")
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


def _resolve(obj, source, limit, memo=None):
    """Replace every pending tensor inside ``obj`` (containers and module stubs) by its array;
    the arrays' bytes count against ``limit`` (:class:`~paddle_cae.io.pd.SizeLimit`)."""
    if memo is None:
        memo = {}
    oid = id(obj)
    if oid in memo:
        return memo[oid]
    if isinstance(obj, _PendingTensor):
        result = _materialise(obj, source, limit)
    elif isinstance(obj, dict):
        for k in list(obj.keys()):
            obj[k] = _resolve(obj[k], source, limit, memo)
        result = obj
    elif isinstance(obj, list):
        obj[:] = [_resolve(v, source, limit, memo) for v in obj]
        result = obj
    elif isinstance(obj, tuple):
        result = tuple(_resolve(v, source, limit, memo) for v in obj)
    elif isinstance(obj, TorchModuleStub):
        obj.state = _resolve(obj.state, source, limit, memo)
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


LEGACY_MAGIC_BYTES = _LEGACY_MAGIC.to_bytes(10, "little")


def is_legacy_torch(data):
    """True when ``data`` starts like the pre-1.6 ``torch.save`` stream: a pickle whose first
    value is torch's magic number (a 10-byte LONG1), right after the protocol (and frame) header."""
    return data[:1] == b"\x80" and b"\x8a\x0a" + LEGACY_MAGIC_BYTES in data[:32]


def parse_torch_zip(data, source, allowed):
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
    limit = SizeLimit(source, len(data))

    def read_member(name):
        try:
            info = archive.getinfo(name)
        except KeyError:
            return None
        # torch stores its members uncompressed; a compressed one may not expand past the limit
        # (a zip bomb declares gigabytes in a few MB)
        limit.take(info.file_size if info.compress_type != zipfile.ZIP_STORED else 0,
                   f"archive member {name} ({info.file_size:,} bytes uncompressed)")
        try:
            return archive.read(name)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:  # CRC / truncation
            raise CheckpointError(f"{source}: corrupt archive member {name} ({err})") from None

    byteorder = read_member(prefix + "byteorder")
    little = byteorder is None or byteorder.strip() == b"little"
    storages = {}
    pickled = read_member(pkl_name)
    obj = unpickle_from(_TorchUnpickler(io.BytesIO(pickled), source, allowed, storages, limit))
    for key, ref in storages.items():
        raw = read_member(f"{prefix}data/{key}")
        if raw is None:
            raise CheckpointError(f"{source}: storage data/{key} is missing from the archive")
        _attach_storage(ref, raw, source, little)
    return _resolve(obj, source, limit)


def parse_torch_legacy(data, source, allowed):
    """torch 1.0-1.5 format: magic, protocol, sys_info, main pickle, list of storage keys, then
    each storage as <int64 element count><raw bytes> in that order."""
    stream = io.BytesIO(data)
    limit = SizeLimit(source, len(data))

    def next_pickle(storages):
        return unpickle_from(_TorchUnpickler(stream, source, allowed, storages, limit))

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
    return _resolve(obj, source, limit)


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


