"""This package's ``.pd`` files: the safe pickle reader shared by every weights format and the
atomic writer.

A ``.pd`` file is a pickle (protocol 4) of plain objects only: dicts, lists, tuples, strings,
numbers, bools, None and numpy arrays. That is the same shape of file ``paddle.save`` writes for a
state_dict, so ``paddle.load`` reads ours and :func:`paddle_cae.io.read_weights` reads paddle's.

Pickles can run arbitrary code while loading, so the reader never uses ``pickle.load`` as is: it
rebuilds only the handful of globals that plain data needs (numpy's array/dtype/scalar
reconstructors, ``collections.OrderedDict`` and a few harmless builtins) and refuses everything
else before it is imported or called.
"""
import collections
import collections.abc
import io
import os
import pickle
import tempfile

import numpy as np

__all__ = ["CheckpointError", "PICKLE_PROTOCOL", "SAFE_DATA_GLOBALS", "SafeUnpickler", "link_checkpoint",
           "load_pickle_bytes", "parse_pd", "read_file_bytes", "save_checkpoint", "to_plain",
           "unwrap_paddle_tensors"]

PICKLE_PROTOCOL = 4
PADDLE_NAME_TABLE = "StructuredToParameterName@@"


class CheckpointError(ValueError):
    """A weights or checkpoint file cannot be read (missing, truncated, corrupt, of another
    format, or it asks for a global that is not on the allow-list). The message is one line
    naming the file."""


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
    return table


def _latin1_encode(text, encoding="latin1"):
    """Python 3 writes ``bytes`` into protocol-2 pickles as ``_codecs.encode(str, 'latin1')``.
    Only that exact use is honoured; other codecs are refused."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r} is not allowed")
    return text.encode("latin1")


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


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only globals present in ``allowed`` ((module, name) -> object)."""

    # what the refusal message says the file may contain
    accepted = "checkpoints may only contain tensors/arrays and plain containers (the file may try to run code)"

    def __init__(self, file, source, allowed=SAFE_DATA_GLOBALS):
        super().__init__(file)
        self.source = str(source)
        self.allowed = allowed

    def find_class(self, module, name):
        key = normalise_global(module, name)
        if key in self.allowed:
            return self.allowed[key]
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
    fd, tmp_path = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
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
