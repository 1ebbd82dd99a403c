"""Plain-data broadcasts between ranks (rank 0 -> all), for decisions taken once.

Objects travel as the same restricted pickle as a ``.pd`` checkpoint (plain containers, numbers,
strings, numpy arrays) and are read back with the safe unpickler. In a single process every
function returns its argument unchanged.
"""
import pickle

import numpy as np
import paddle

from .checkpoint import PICKLE_PROTOCOL, load_pickle_bytes, to_plain
from .distributed import get_env


def broadcast_object(obj, src=0):
    """``obj`` of rank ``src`` on every rank (other ranks pass anything, e.g. None)."""
    env = get_env()
    if not env.distributed:
        return obj
    import paddle.distributed as dist

    data = pickle.dumps(to_plain(obj), protocol=PICKLE_PROTOCOL) if env.rank == src else b""
    size = paddle.to_tensor([len(data)], dtype="int64")
    dist.broadcast(size, src=src)
    n = int(size.numpy()[0])
    if env.rank == src:
        buffer = paddle.to_tensor(np.frombuffer(data, dtype=np.uint8).copy())
    else:
        buffer = paddle.zeros([n], dtype="uint8")
    dist.broadcast(buffer, src=src)
    if env.rank == src:
        return obj
    return load_pickle_bytes(buffer.numpy().tobytes(), f"broadcast from rank {src}")


__all__ = ["broadcast_object"]
