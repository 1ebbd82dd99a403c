"""Process setup under ``python -m paddle.distributed.launch`` (NCCL on GPUs, gloo on CPUs),
rank queries, metric reductions and a start-up barrier that names missing ranks.

Paddle's own rendezvous waits up to 15 minutes for a rank that never comes and then fails
without saying which one. Before it, rank 0 runs a small TCP rendezvous on its trainer
endpoint: every rank reports in, and after ``timeout`` seconds rank 0 stops with the list
of ranks that did not.
"""
import logging
import os
import socket
import time
from dataclasses import dataclass

import paddle
import paddle.distributed as dist

logger = logging.getLogger(__name__)


class StartupTimeout(RuntimeError):
    pass


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def env_from_launcher():
    return DistEnv(rank=int(os.environ.get("PADDLE_TRAINER_ID", 0)),
                   world_size=int(os.environ.get("PADDLE_TRAINERS_NUM", 1)),
                   local_rank=int(os.environ.get("PADDLE_LOCAL_RANK",
                                                 os.environ.get("PADDLE_RANK_IN_NODE", 0))))


_ENV = DistEnv()


def get_env():
    return _ENV


def init_distributed(startup_timeout=300.0):
    """Initialise the process group when launched with several processes. Returns DistEnv."""
    global _ENV
    env = env_from_launcher()
    if env.distributed:
        endpoints = os.environ.get("PADDLE_TRAINER_ENDPOINTS", "").split(",")
        if endpoints and endpoints[0]:
            startup_barrier(env.rank, env.world_size, endpoints[0], startup_timeout)
        dist.init_parallel_env()
    _ENV = env
    return env


def startup_barrier(rank, world_size, rank0_endpoint, timeout=300.0):
    """Every rank checks in with rank 0 at ``rank0_endpoint`` (host:port); raises
    StartupTimeout naming the ranks that did not arrive within ``timeout`` seconds."""
    host, port = rank0_endpoint.rsplit(":", 1)
    port = int(port)
    deadline = time.time() + timeout
    if rank == 0:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("", port))
        server.listen(world_size)
        arrived = {0: None}
        try:
            while len(arrived) < world_size:
                remaining = deadline - time.time()
                if remaining <= 0:
                    missing = sorted(set(range(world_size)) - set(arrived))
                    raise StartupTimeout(
                        f"start-up barrier: rank(s) {', '.join(map(str, missing))} of {world_size} "
                        f"did not join within {timeout:.0f} s (rank 0 at {rank0_endpoint}); "
                        "check that every node was launched with the same --nnodes/--master")
                server.settimeout(min(remaining, 1.0))
                try:
                    conn, _ = server.accept()
                except socket.timeout:
                    continue
                conn.settimeout(10)
                try:
                    other = int(conn.recv(16).decode().strip() or -1)
                except (OSError, ValueError):
                    conn.close()
                    continue
                arrived[other] = conn
            for conn in arrived.values():
                if conn is not None:
                    conn.sendall(b"go")
                    conn.close()
        finally:
            server.close()
        return
    while True:
        remaining = deadline - time.time()
        if remaining <= 0:
            raise StartupTimeout(f"start-up barrier: rank {rank} could not reach rank 0 at "
                                 f"{rank0_endpoint} within {timeout:.0f} s")
        try:
            conn = socket.create_connection((host, port), timeout=min(remaining, 5.0))
        except OSError:
            time.sleep(0.2)
            continue
        try:
            conn.sendall(f"{rank}".encode())
            conn.settimeout(max(deadline - time.time(), 1.0))
            if conn.recv(2) == b"go":
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.2)


def _all_reduce_dict(values, average):
    if not _ENV.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = paddle.to_tensor([float(values[k]) for k in keys], dtype="float64")
    dist.all_reduce(t)
    if average:
        t = t / _ENV.world_size
    return dict(zip(keys, t.numpy().tolist()))


def all_reduce_mean(values):
    """Average a dict of python floats over ranks (identity in a single process)."""
    return _all_reduce_dict(values, average=True)


def all_reduce_sum(values):
    return _all_reduce_dict(values, average=False)


def barrier():
    if _ENV.distributed:
        dist.barrier()


def unwrap_model(model):
    """The bare model behind a ``paddle.DataParallel`` wrapper (its parameter names lose the
    ``_layers.`` prefix); any other model unchanged."""
    return model._layers if isinstance(model, paddle.DataParallel) else model


def unused_parameter_names(model):
    """Names of the trainable parameters of ``model`` that its current flags leave without a
    gradient, as the model declares them (``unused_parameter_names()``, models/base.py; any
    other Layer declares none). Parameters with stop_gradient are never listed."""
    declared = getattr(model, "unused_parameter_names", None)
    names = set(declared()) if callable(declared) else set()
    return [n for n, p in model.named_parameters() if not p.stop_gradient and n in names]


def data_parallel(model, env=None, find_unused_parameters=False):
    """``model`` wrapped for data-parallel training (unchanged in a single process).

    paddle.DataParallel waits, in every backward, for a gradient of each trainable parameter.
    The parameters the model's flags leave out of the loss (:func:`unused_parameter_names`,
    e.g. BootMAE's feature decoder with ``--feature_weight 0``) are therefore frozen
    (``stop_gradient``) before wrapping: they could not change anyway (no gradient, so no
    update and no weight decay, as in PyTorch), and Paddle's ``find_unused_parameters=True``
    does not help here, since it counts a parameter as used when it reaches any forward output,
    not the loss."""
    if not (env or _ENV).distributed:
        return model
    unused = unused_parameter_names(model)
    if unused:
        params = dict(model.named_parameters())
        for name in unused:
            params[name].stop_gradient = True
        logger.info("data-parallel: %d parameter tensor(s) get no gradient with these flags "
                    "(e.g. %s); they are frozen", len(unused), unused[0])
    return paddle.DataParallel(model, find_unused_parameters=find_unused_parameters)


def broadcast_parameters(model):
    """Start every rank from rank 0's weights (paddle.DataParallel also syncs at wrap time)."""
    if not _ENV.distributed:
        return
    for p in model.parameters():
        dist.broadcast(p, src=0)


def all_gather_ints(value):
    """[value of rank 0, value of rank 1, ...] for a python int (a list of one in a single
    process)."""
    if not _ENV.distributed:
        return [int(value)]
    gathered = []
    dist.all_gather(gathered, paddle.to_tensor([int(value)], dtype="int64"))
    return [int(t.item()) for t in gathered]


def state_digest(layer):
    """A 56-bit digest of every entry of ``layer.state_dict()`` (names and exact bytes)."""
    import hashlib

    h = hashlib.sha256()
    for name, value in sorted(layer.state_dict().items()):
        h.update(name.encode())
        h.update(value.numpy().tobytes())
    return int.from_bytes(h.digest()[:7], "little")


def ranks_in_sync(layer):
    """True when every rank holds bit-identical weights (always True in one process)."""
    digests = all_gather_ints(state_digest(layer))
    return len(set(digests)) == 1
