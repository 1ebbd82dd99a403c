"""Write PyTorch checkpoint files without PyTorch, for tests.

``write_torch_zip(path, obj)`` produces what ``torch.save(obj, path)`` writes (torch >= 1.6 zip
layout, pickle protocol 2) when ``obj`` holds tensors; here tensors are numpy arrays. The zip is laid
out the way torch's writer does it (stored entries, data aligned to 64 bytes by an ``FB`` extra
field, data descriptors, zip64 end records) and the pickle uses the same globals and opcodes
(``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage`` persistent ids, ``collections.OrderedDict``
backward hooks), so the reader is exercised on the real thing. ``write_torch_legacy`` writes the
pre-1.6 single-stream format, and ``write_torch_module_pickle`` a whole pickled module the way
DALL-E's ``encoder.pkl`` is stored.

Globals are written by name (``GLOBAL module name``) without importing anything: no torch, dall_e
or other package is needed, and nothing is registered in ``sys.modules``.

Helpers for what plain arrays cannot express:
- ``TensorView(storage_array, offset, size, stride)``: a tensor that is a strided view of a storage
  (several views may share one storage array).
- ``BFloat16(uint16_bits)``: a bfloat16 tensor given by its raw 16-bit words.
- ``Parameter(array)``: an ``nn.Parameter`` (pickled through ``_rebuild_parameter``).
- ``Device('cpu')``: a ``torch.device``.
- ``Global('os', 'system')``: any global by name, e.g. to build malicious pickles.
- ``TorchModule('dall_e.utils', 'Conv2d', attrs, parameters=..., buffers=..., modules=...)``.
"""
import collections
import io
import pickle
import struct
import zlib

import numpy as np

_STORAGE_NAMES = {
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


class Global:
    """A global written into the pickle as ``GLOBAL module name``, never imported."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __repr__(self):
        return f"{self.module}.{self.name}"


REBUILD_TENSOR_V2 = Global("torch._utils", "_rebuild_tensor_v2")
REBUILD_PARAMETER = Global("torch._utils", "_rebuild_parameter")
TORCH_DEVICE = Global("torch", "device")


class TensorView:
    def __init__(self, storage, offset, size, stride):
        self.storage = np.ascontiguousarray(storage).reshape(-1) if not isinstance(storage, BFloat16) else storage
        self.offset, self.size, self.stride = int(offset), tuple(size), tuple(stride)


class BFloat16:
    def __init__(self, bits):
        self.bits = np.ascontiguousarray(bits, dtype=np.uint16)


class Parameter:
    def __init__(self, data, requires_grad=True):
        self.data, self.requires_grad = data, requires_grad


class Device:
    def __init__(self, name="cpu"):
        self.name = name


class Call:
    """``Call(Global(...), args)``: pickled as REDUCE, i.e. the global is called on unpickling."""

    def __init__(self, func, args):
        self.func, self.args = func, tuple(args)


class TorchModule:
    """A pickled ``nn.Module`` instance of class ``module.name`` (NEWOBJ + BUILD of its __dict__,
    as the default pickling of a module does)."""

    def __init__(self, module, name, attrs=None, parameters=None, buffers=None, modules=None):
        self.cls = Global(module, name)
        self.attrs = dict(attrs or {})
        self.parameters = collections.OrderedDict(parameters or {})
        self.buffers = collections.OrderedDict(buffers or {})
        self.modules = collections.OrderedDict(modules or {})

    def pickled_state(self):
        state = {"training": False}
        state["_parameters"] = collections.OrderedDict(
            (k, v if v is None or isinstance(v, Parameter) else Parameter(v)) for k, v in self.parameters.items()
        )
        state["_buffers"] = self.buffers
        state["_non_persistent_buffers_set"] = set()
        for hooks in ("_backward_hooks", "_forward_hooks", "_forward_pre_hooks",
                      "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            state[hooks] = collections.OrderedDict()
        state["_modules"] = self.modules
        state.update(self.attrs)
        return state


class _Storage:
    def __init__(self, key, storage_name, raw, numel):
        self.key, self.storage_name, self.raw, self.numel = key, storage_name, raw, numel


class _TorchPickler(pickle._Pickler):
    """Pure-Python pickler (protocol 2) that writes fake globals by name and storages as
    persistent ids, like torch's pickler does."""

    def __init__(self, file, legacy=False):
        super().__init__(file, protocol=2)
        self.legacy = legacy
        self.storages = collections.OrderedDict()  # id(source) -> _Storage
        self._keep_alive = []

    # --- globals by name -------------------------------------------------------------------
    def save_global(self, obj, name=None):
        if isinstance(obj, _GlobalType):
            module, name = obj.spec
            self.write(pickle.GLOBAL + module.encode() + b"\n" + name.encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)

    def _as_type(self, glob):
        # save() dispatches classes to save_global; a class object per global name gets us there
        t = _GLOBAL_TYPES.get((glob.module, glob.name))
        if t is None:
            t = _GLOBAL_TYPES[(glob.module, glob.name)] = _GlobalType(glob.module, glob.name)
        return t

    # --- storages ----------------------------------------------------------------------------
    def _storage_for(self, source):
        found = self.storages.get(id(source))
        if found is not None:
            return found
        if isinstance(source, BFloat16):
            name, raw, numel = "BFloat16Storage", source.bits.tobytes(), source.bits.size
        else:
            array = np.ascontiguousarray(source)
            name = _STORAGE_NAMES.get(array.dtype)
            if name is None:
                raise TypeError(f"no torch storage for numpy dtype {array.dtype}")
            raw, numel = array.astype(array.dtype.newbyteorder("<")).tobytes(), array.size
        storage = _Storage(str(len(self.storages)), name, raw, numel)
        self.storages[id(source)] = storage
        self._keep_alive.append(source)
        return storage

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            storage_type = self._as_type(Global("torch", obj.storage_name))
            if self.legacy:
                return ("storage", storage_type, obj.key, "cpu", obj.numel, None)
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None

    # --- tensors, modules and friends -------------------------------------------------------
    def reducer_override(self, obj):
        if isinstance(obj, Global):
            raise TypeError(f"use Call({obj!r}, args) to put a global into a pickle")
        if isinstance(obj, np.ndarray):
            return self._tensor_reduce(obj, obj, 0, obj.shape, _contiguous_strides(obj.shape))
        if isinstance(obj, BFloat16):
            bits = obj.bits
            return self._tensor_reduce(obj, obj, 0, bits.shape, _contiguous_strides(bits.shape))
        if isinstance(obj, TensorView):
            return self._tensor_reduce(obj, obj.storage, obj.offset, obj.size, obj.stride)
        if isinstance(obj, Parameter):
            return (self._as_type(REBUILD_PARAMETER), (obj.data, obj.requires_grad, collections.OrderedDict()))
        if isinstance(obj, Device):
            return (self._as_type(TORCH_DEVICE), (obj.name,))
        if isinstance(obj, Call):
            return (self._as_type(obj.func), obj.args)
        return NotImplemented

    def save_torch_module(self, obj):
        # what pickling an nn.Module instance writes: cls, (), NEWOBJ, then BUILD with its __dict__
        # (written by hand: save_reduce insists that obj really is an instance of cls)
        self.save(self._as_type(obj.cls))
        self.save(())
        self.write(pickle.NEWOBJ)
        self.memoize(obj)
        self.save(obj.pickled_state())
        self.write(pickle.BUILD)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[TorchModule] = save_torch_module

    def _tensor_reduce(self, obj, source, offset, size, stride):
        storage = self._storage_for(source)
        size = tuple(int(s) for s in size)
        stride = tuple(int(s) for s in stride)
        return (self._as_type(REBUILD_TENSOR_V2),
                (storage, int(offset), size, stride, False, collections.OrderedDict()))


class _GlobalType(type):
    """Metaclass instances standing for one global name; only their ``spec`` matters."""

    def __new__(mcs, module, name):
        cls = super().__new__(mcs, name, (), {"__module__": module})
        cls.spec = (module, name)
        return cls

    def __init__(cls, module, name):
        super().__init__(name, (), {})


_GLOBAL_TYPES = {}


def _contiguous_strides(shape):
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(int(n), 1)
    return tuple(reversed(strides))


def torch_pickle(obj, legacy=False):
    """(pickle bytes, storages in key order) of ``obj`` as torch would pickle it."""
    buf = io.BytesIO()
    pickler = _TorchPickler(buf, legacy=legacy)
    pickler.dump(obj)
    return buf.getvalue(), list(pickler.storages.values())


# ---------------------------------------------------------------------------------------------
# zip container, laid out like torch's writer
# ---------------------------------------------------------------------------------------------
_ALIGNMENT = 64


def _zip_bytes(records):
    out = io.BytesIO()
    central = []
    for name, data in records:
        name_b = name.encode()
        offset = out.tell()
        header_len = 30 + len(name_b)
        pad = (-(offset + header_len + 4)) % _ALIGNMENT  # data starts on a 64-byte boundary
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        crc = zlib.crc32(data) & 0xFFFFFFFF
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, 0x0808, 0, 0, 0, 0, 0, 0, len(name_b), len(extra)))
        out.write(name_b + extra)
        out.write(data)
        out.write(struct.pack("<IIII", 0x08074B50, crc, len(data), len(data)))
        central.append((name_b, crc, len(data), offset))
    cd_offset = out.tell()
    for name_b, crc, size, offset in central:
        out.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, 0x0808, 0, 0, 0, crc, size, size,
                              len(name_b), 0, 0, 0, 0, 0, offset))
        out.write(name_b)
    cd_size = out.tell() - cd_offset
    zip64_offset = out.tell()
    n = len(central)
    out.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x2D, 0, 0, n, n, cd_size, cd_offset))
    out.write(struct.pack("<IIQI", 0x07064B50, 0, zip64_offset, 1))
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, cd_size, cd_offset, 0))
    return out.getvalue()


def torch_zip_bytes(obj, prefix="archive", pickle_bytes=None, serialization_id=b"0" * 40):
    """The bytes of ``torch.save(obj)`` in the zip format. ``pickle_bytes`` replaces data.pkl
    (e.g. with a malicious pickle); its storages then come from ``obj``."""
    data_pkl, storages = torch_pickle(obj)
    if pickle_bytes is not None:
        data_pkl = pickle_bytes
    records = [(f"{prefix}/data.pkl", data_pkl), (f"{prefix}/.format_version", b"1"),
               (f"{prefix}/.storage_alignment", b"64"), (f"{prefix}/byteorder", b"little")]
    records += [(f"{prefix}/data/{s.key}", s.raw) for s in storages]
    records += [(f"{prefix}/version", b"3\n"), (f"{prefix}/.data/serialization_id", serialization_id)]
    return _zip_bytes(records)


def write_torch_zip(path, obj, prefix=None, pickle_bytes=None, serialization_id=b"0" * 40):
    """Write ``obj`` (dicts/lists of numpy arrays and the helper objects above) as torch.save would."""
    path = str(path)
    if prefix is None:
        import os

        prefix = os.path.splitext(os.path.basename(path))[0]
    data = torch_zip_bytes(obj, prefix=prefix, pickle_bytes=pickle_bytes, serialization_id=serialization_id)
    with open(path, "wb") as f:
        f.write(data)
    return path


def write_torch_module_pickle(path, module, prefix=None):
    """Write a whole pickled module (a :class:`TorchModule` tree), like DALL-E's encoder.pkl."""
    if not isinstance(module, TorchModule):
        raise TypeError("write_torch_module_pickle expects a TorchModule")
    return write_torch_zip(path, module, prefix=prefix)


def write_torch_legacy(path, obj):
    """Write ``obj`` in torch's pre-1.6 single-stream format: magic number, protocol, sys_info,
    the pickle, the storage key list, then each storage as <int64 count><raw little-endian data>."""
    out = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001,
                   {"protocol_version": 1001, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(header, out, protocol=2)
    data_pkl, storages = torch_pickle(obj, legacy=True)
    out.write(data_pkl)
    pickle.dump([s.key for s in storages], out, protocol=2)
    for s in storages:
        out.write(struct.pack("<q", s.numel))
        out.write(s.raw)
    with open(str(path), "wb") as f:
        f.write(out.getvalue())
    return str(path)


def dalle_encoder_module(rng, n_in=3, n_hid=4, vocab=8, with_id_path=True):
    """A tiny DALL-E-style encoder tree: input conv, one group with a block (ReLU/conv res path,
    1x1 id path conv or nn.Identity), max-pool, output ReLU + conv. Returns (module, state_dict)."""

    def conv(n_i, n_o, kw, name_prefix, expected, use_float16=True):
        w = rng.standard_normal((n_o, n_i, kw, kw)).astype(np.float32)
        b = rng.standard_normal(n_o).astype(np.float32)
        expected[name_prefix + "w"] = w
        expected[name_prefix + "b"] = b
        return TorchModule("dall_e.utils", "Conv2d",
                           attrs={"n_in": n_i, "n_out": n_o, "kw": kw, "use_float16": use_float16,
                                  "device": Device("cpu"), "requires_grad": False},
                           parameters={"w": Parameter(w, False), "b": Parameter(b, False)})

    expected = collections.OrderedDict()
    relu = lambda: TorchModule("torch.nn.modules.activation", "ReLU", attrs={"inplace": False})  # noqa: E731
    input_conv = conv(n_in, n_hid, 7, "blocks.input.", expected)
    width = 2 * n_hid if with_id_path else n_hid
    block_prefix = "blocks.group_1.block_1."
    if with_id_path:
        id_path = conv(n_hid, width, 1, block_prefix + "id_path.", expected)
    else:
        id_path = TorchModule("torch.nn.modules.linear", "Identity")
    res = collections.OrderedDict()
    hid = width // 4 or 1
    dims = [(n_hid, hid, 3), (hid, hid, 3), (hid, hid, 3), (hid, width, 1)]
    for i, (a, b, k) in enumerate(dims, start=1):
        res[f"relu_{i}"] = relu()
        res[f"conv_{i}"] = conv(a, b, k, f"{block_prefix}res_path.conv_{i}.", expected)
    block = TorchModule("dall_e.encoder", "EncoderBlock",
                        attrs={"n_in": n_hid, "n_out": width, "n_layers": 1, "device": None,
                               "requires_grad": False, "n_hid": hid, "post_gain": 1.0},
                        modules={"id_path": id_path,
                                 "res_path": TorchModule("torch.nn.modules.container", "Sequential", modules=res)})
    pool = TorchModule("torch.nn.modules.pooling", "MaxPool2d",
                       attrs={"kernel_size": 2, "stride": 2, "padding": 0, "dilation": 1,
                              "return_indices": False, "ceil_mode": False})
    group = TorchModule("torch.nn.modules.container", "Sequential",
                        modules={"block_1": block, "pool": pool})
    output = TorchModule("torch.nn.modules.container", "Sequential",
                         modules={"relu": relu(), "conv": None})
    output.modules["conv"] = conv(width, vocab, 1, "blocks.output.conv.", expected, use_float16=False)
    blocks = TorchModule("torch.nn.modules.container", "Sequential",
                         modules={"input": input_conv, "group_1": group, "output": output})
    encoder = TorchModule("dall_e.encoder", "Encoder",
                          attrs={"group_count": 1, "n_hid": n_hid, "n_blk_per_group": 1,
                                 "input_channels": n_in, "vocab_size": vocab, "device": Device("cpu"),
                                 "requires_grad": False, "use_mixed_precision": True},
                          modules={"blocks": blocks})
    return encoder, expected
