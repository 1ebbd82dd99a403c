"""This package's ``.pd`` files: the safe pickle reader shared by every weights format and the
atomic writer.

A ``.pd`` file is a pickle (protocol 4) of plain objects only: dicts, lists, tuples, strings,
numbers, bools, None and numpy arrays. That is the same shape of file ``paddle.save`` writes for a
state_dict, so ``paddle.load`` reads ours and :func:`paddle_cae.io.read_weights` reads paddle's.

Pickles can run arbitrary code while loading, so the reader never uses ``pickle.load`` as is: it
rebuilds only the handful of globals that plain data needs (numpy's array/dtype/scalar
reconstructors, ``collections.OrderedDict`` and a few harmless builtins) and refuses everything
else before it is imported or called.

A few bytes of pickle can also ask for gigabytes (``bytearray(2**31)``, ``list(range(...))``,
an empty array of a huge shape, a memo slot numbered in the billions). The reader therefore runs
Python's own unpickler (its memo is a dict, not an array sized by the largest slot number) and
checks every size an allowed constructor would allocate from a number instead of from the
file's bytes against the file's length (:class:`SizeLimit`): what a file can make the reader
allocate is bounded by a small multiple of its size, and a file that asks for more is refused in
one line.
"""
import collections
import collections.abc
import errno
import io
import os
import pickle
import shutil
import tempfile

import numpy as np

__all__ = ["CheckpointError", "CheckpointWriteError", "PICKLE_PROTOCOL", "SAFE_DATA_GLOBALS", "SafeUnpickler", "SizeLimit", "link_checkpoint",
           "load_pickle_bytes", "parse_pd", "read_file_bytes", "save_checkpoint", "to_plain",
           "unwrap_paddle_tensors"]

PICKLE_PROTOCOL = 4
PADDLE_NAME_TABLE = "StructuredToParameterName@@"


class CheckpointError(ValueError):
    """A weights or checkpoint file cannot be read (missing, truncated, corrupt, of another
    format, or it asks for a global that is not on the allow-list). The message is one line
    naming the file."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written because its folder is full (or over quota). The
    message is one line naming the folder, the space the file needs and the space left; the
    previous file under that name is untouched and no temporary file is left."""


# ----------------------------------------------------------------------------------------------
# globals that rebuild plain data only
# ----------------------------------------------------------------------------------------------
def _numpy_globals():
    """numpy moved ``numpy.core`` to ``numpy._core`` in 2.0; pickles from either side name
    either module, so both spellings are accepted and resolved to what this numpy has."""
    from numpy.lib import format as _unused  # noqa: F401  (ensures numpy is fully imported)

    try:
        from numpy._core import multiarray as _multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as _multiarray
    try:
        from numpy._core import numeric as _numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import numeric as _numeric

    table = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(mod, "_reconstruct")] = _multiarray._reconstruct
        table[(mod, "scalar")] = _multiarray.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        # protocol-5 pickles of arrays go through _frombuffer(buffer, dtype, shape, order)
        table[(mod, "_frombuffer")] = _numeric._frombuffer
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    _SIZE_GUARDS[_multiarray._reconstruct] = _guarded_reconstruct(_multiarray._reconstruct)
    return table


class SizeLimit:
    """What one file may make the reader allocate from numbers in it rather than from its bytes:
    ``limit`` bytes in all (``slack`` plus ``ratio`` times the file's ``size``). ``take(n, what)``
    counts ``n`` bytes and raises a one-line :class:`CheckpointError` past the limit."""

    slack = 1 << 20
    ratio = 4

    def __init__(self, source, size):
        self.source = str(source)
        self.size = int(size)
        self.limit = self.slack + self.ratio * self.size
        self.used = 0

    def take(self, nbytes, what):
        self.used += int(nbytes)
        if nbytes < 0 or self.used > self.limit:
            raise CheckpointError(
                f"{self.source}: refused: {what} asks for {_human_bytes(nbytes)} from a file of "
                f"{_human_bytes(self.size)} (at most {_human_bytes(self.limit)} may come from "
                "sizes declared in a file: a memory bomb or a corrupt file)")


def _human_bytes(n):
    n = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _length_of(value):
    """How many items (bytes) a constructor would make from ``value`` without reading them from
    the file: an int (``bytearray(n)``) or a range; None for anything already in memory."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, range):
        try:
            return len(value)
        except OverflowError:
            return 1 << 80
    return None


def _sized_constructor(constructor, itemsize):
    """``constructor`` with its first argument's declared length counted against the limit."""

    def guarded(limit):
        def call(*args, **kwargs):
            if args:
                n = _length_of(args[0])
                if n is not None:
                    limit.take(n * itemsize, f"{constructor.__name__}() of {n:,} items")
            return constructor(*args, **kwargs)
        return call
    return guarded


def _nbytes_of(shape, dtype):
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    count = 1
    for dim in shape:
        count *= max(int(dim), 0)
    return count * np.dtype(dtype).itemsize


class _NdarrayType:
    """What ``numpy.ndarray`` resolves to in a file: it stands for the type (numpy's pickles pass
    it to ``_reconstruct``); called directly, it counts the array's bytes against the limit."""

    def __init__(self, limit):
        self.limit = limit

    def __call__(self, shape, dtype=float, *args, **kwargs):
        self.limit.take(_nbytes_of(shape, dtype), f"numpy.ndarray of shape {shape}")
        return np.ndarray(shape, dtype, *args, **kwargs)


def _guarded_reconstruct(reconstruct):
    def guarded(limit):
        def call(subtype, shape, dtype):
            if isinstance(subtype, _NdarrayType):
                subtype = np.ndarray
            if subtype is not np.ndarray:
                raise CheckpointError(f"{limit.source}: refused: numpy _reconstruct of "
                                      f"{type(subtype).__name__} (only numpy.ndarray)")
            # numpy's own pickles start from an empty array; the data comes with __setstate__
            limit.take(_nbytes_of(shape, "uint8" if isinstance(dtype, bytes) else dtype),
                       f"numpy array of shape {shape}")
            return reconstruct(subtype, shape, dtype)
        return call
    return guarded


def _latin1_encode(text, encoding="latin1"):
    """Python 3 writes ``bytes`` into protocol-2 pickles as ``_codecs.encode(str, 'latin1')``.
    Only that exact use is honoured; other codecs are refused."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r} is not allowed")
    return text.encode("latin1")


# allowed objects that would allocate from a number in the file -> guard(limit) -> callable
_SIZE_GUARDS = {
    bytearray: _sized_constructor(bytearray, 1),
    bytes: _sized_constructor(bytes, 1),
    list: _sized_constructor(list, 8),
    tuple: _sized_constructor(tuple, 8),
    set: _sized_constructor(set, 8),
    frozenset: _sized_constructor(frozenset, 8),
    dict: _sized_constructor(dict, 8),
    np.ndarray: _NdarrayType,
}

SAFE_DATA_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "slice"): slice,
    ("builtins", "range"): range,
    ("builtins", "tuple"): tuple,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("_codecs", "encode"): _latin1_encode,
}
SAFE_DATA_GLOBALS.update(_numpy_globals())

# protocol < 3 pickles name Python 2 modules; map them the way pickle's own fix_imports would
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def normalise_global(module, name):
    return _PY2_MODULES.get(module, module), name


class SafeUnpickler(pickle._Unpickler):
    """Unpickler that resolves only globals present in ``allowed`` ((module, name) -> object),
    with every size they would allocate from a number in the file counted against ``limit``
    (a :class:`SizeLimit`; by default from the length of ``file``).

    Python's unpickler, not the C one: the C unpickler sizes its memo by the largest slot number
    a file names (9 bytes of pickle can make it allocate 4 GiB)."""

    # what the refusal message says the file may contain
    accepted = "checkpoints may only contain tensors/arrays and plain containers (the file may try to run code)"

    def __init__(self, file, source, allowed=SAFE_DATA_GLOBALS, limit=None):
        super().__init__(file)
        self.source = str(source)
        self.allowed = allowed
        if limit is None:
            limit = SizeLimit(source, len(file.getbuffer()) if hasattr(file, "getbuffer") else 0)
        self.limit = limit
        self._guarded = {}

    def find_class(self, module, name):
        key = normalise_global(module, name)
        if key in self.allowed:
            value = self.allowed[key]
            try:
                guard = _SIZE_GUARDS.get(value)
            except TypeError:  # unhashable allowed value
                guard = None
            if guard is None:
                return value
            if key not in self._guarded:
                self._guarded[key] = guard(self.limit)
            return self._guarded[key]
        raise CheckpointError(
            f"{self.source}: refused to load global '{key[0]}.{key[1]}': {self.accepted}{self.refusal_hint(key)}")

    def refusal_hint(self, key):
        return ""

    def persistent_load(self, pid):
        raise CheckpointError(
            f"{self.source}: unexpected persistent id {str(pid)[:60]!r} (this is not a .pd/.pdparams "
            "pickle; PyTorch .pth files are read by paddle_cae.io.read_weights)"
        )


def describe_read_error(source, err):
    """One line explaining why a pickle stream could not be read."""
    if isinstance(err, CheckpointError):
        return str(err)
    if isinstance(err, EOFError):
        return f"{source}: file ends too early (truncated checkpoint?)"
    if isinstance(err, MemoryError):
        return f"{source}: corrupt checkpoint (asks for an impossible amount of memory)"
    detail = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"{source}: not a readable checkpoint ({type(err).__name__}: {detail})"


def unpickle_from(unpickler):
    """``unpickler.load()`` with every failure turned into a one-line :class:`CheckpointError`
    naming ``unpickler.source`` (pickle raises many types on garbage input)."""
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(describe_read_error(unpickler.source, err)) from None


def load_pickle_bytes(data, source, allowed=SAFE_DATA_GLOBALS):
    """Unpickle ``data`` with :class:`SafeUnpickler`, turning every failure into
    :class:`CheckpointError`."""
    if not data:
        raise CheckpointError(f"{source}: file is empty")
    return unpickle_from(SafeUnpickler(io.BytesIO(data), source, allowed))


def read_file_bytes(path):
    """(path as str, the file's bytes); a missing or unreadable file is a one-line
    :class:`CheckpointError`."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            return source, f.read()
    except OSError as err:
        raise CheckpointError(f"{source}: cannot read checkpoint ({err.strerror or err})") from None


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
                                   if k != PADDLE_NAME_TABLE)


def parse_pd(data, source):
    """The plain objects of a ``.pd`` file of this package or a ``.pd``/``.pdparams`` written by
    ``paddle.save`` (its name-table entry dropped)."""
    obj = load_pickle_bytes(data, source)
    if isinstance(obj, dict):
        # paddle.save adds this bookkeeping entry (structured -> global parameter names)
        obj.pop(PADDLE_NAME_TABLE, None)
    return obj


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def to_plain(obj, where="checkpoint"):
    """Turn ``obj`` into the plain objects a ``.pd`` file may hold: mappings -> dict (order
    kept), tuples/lists kept, paddle Tensors and numpy scalars -> numpy arrays/numbers.
    Anything else raises TypeError naming where it was found."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, complex)):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"{where}: numpy arrays of Python objects cannot be saved")
        return obj
    if isinstance(obj, np.generic):
        return obj.item() if obj.dtype.kind in "biufc" else np.asarray(obj)
    if isinstance(obj, collections.abc.Mapping):
        return {k: to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if hasattr(obj, "numpy") and callable(obj.numpy):  # paddle.Tensor / EagerParamBase
        return np.asarray(obj.numpy())
    raise TypeError(f"{where}: cannot save an object of type {type(obj).__module__}.{type(obj).__name__}")


# the last training state written per directory: (fingerprint, path, (inode, size, mtime))
_LAST_SAVED = {}


def _training_state_fingerprint(obj):
    """Identity of a training state dict (``kind`` + ``epoch``) for as long as its caller holds
    it; None for anything else (those are always written in full)."""
    if not (isinstance(obj, dict) and "kind" in obj and "epoch" in obj and "model" in obj):
        return None
    return (id(obj), id(obj["model"]), obj.get("kind"), obj.get("epoch"), obj.get("batches_done"),
            obj.get("global_step"))


def _file_signature(path):
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def link_checkpoint(source, path):
    """Make ``path`` a hard link of the checkpoint ``source`` (same directory), atomically
    replacing an older ``path``. False where the file system has no hard links."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp_path = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.link.tmp")
    try:
        if os.path.lexists(tmp_path):
            os.unlink(tmp_path)
        os.link(source, tmp_path)
        os.replace(tmp_path, path)
    except OSError:
        _remove_quietly(tmp_path)
        return False
    _fsync_directory(directory)
    return True


def _payload_bytes(obj):
    """About how many bytes ``obj`` (plain data from :func:`to_plain`) takes in a pickle."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes + 128
    if isinstance(obj, dict):
        return sum(_payload_bytes(k) + _payload_bytes(v) for k, v in obj.items()) + 8
    if isinstance(obj, (list, tuple)):
        return sum(_payload_bytes(v) for v in obj) + 8
    if isinstance(obj, (str, bytes)):
        return len(obj) + 8
    return 16


def _disk_full_error(path, directory, plain, err):
    needed = _payload_bytes(plain)
    try:
        free = shutil.disk_usage(directory).free
        left = f", {free / 2 ** 20:.0f} MiB free"
    except OSError:
        left = ""
    return CheckpointWriteError(
        f"cannot save {path}: {err.strerror or 'no space left'} in {directory} (the file needs "
        f"about {needed / 2 ** 20:.0f} MiB{left}); the previous checkpoints there are intact: "
        "free space there (e.g. keep fewer checkpoints with --keep_last) or give another --output_dir")


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def save_checkpoint(obj, path):
    """Write ``obj`` (nested dicts/lists of arrays, tensors, numbers, strings, None) to ``path``
    atomically: pickle into a temporary file in the same directory, flush and fsync it, then
    rename it over ``path``. If anything fails the old ``path`` is left untouched and the
    temporary file is removed.

    A training state (a dict with ``kind``, ``epoch`` and ``model``) saved again, unchanged, under
    another name in the same directory (``checkpoint-latest.pd``, then ``checkpoint-<epoch>.pd``,
    then ``checkpoint-best.pd`` of the same epoch) becomes a hard link of the file just written
    instead of a second full copy; the next save of ``checkpoint-latest.pd`` replaces that name
    only, so the numbered file keeps its content."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fingerprint = _training_state_fingerprint(obj)
    previous = _LAST_SAVED.get(directory)
    if fingerprint is not None and previous is not None and previous[0] == fingerprint:
        source = previous[1]
        try:
            unchanged = os.path.abspath(source) != os.path.abspath(path) and \
                _file_signature(source) == previous[2]
        except OSError:
            unchanged = False
        if unchanged and link_checkpoint(source, path):
            return path
    plain = to_plain(obj)
    os.makedirs(directory, exist_ok=True)
    try:
        fd, tmp_path = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                                        dir=directory)
    except OSError as err:
        if err.errno in _DISK_FULL:
            raise _disk_full_error(path, directory, plain, err) from None
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(plain, f, protocol=PICKLE_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file private (0600); give it the permissions of a normal file
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except OSError as err:
        _remove_quietly(tmp_path)
        if err.errno in _DISK_FULL:
            raise _disk_full_error(path, directory, plain, err) from None
        raise
    except BaseException:
        _remove_quietly(tmp_path)
        raise
    _fsync_directory(directory)
    if fingerprint is not None:
        _LAST_SAVED[directory] = (fingerprint, path, _file_signature(path))
    else:
        _LAST_SAVED.pop(directory, None)
    return path


def _fsync_directory(directory):
    # makes the rename itself durable; not possible on every platform, so best effort
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
