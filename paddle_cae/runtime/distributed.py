"""Process setup under ``python -m paddle.distributed.launch`` (NCCL on GPUs, gloo on CPUs),
rank queries, metric reductions, a start-up barrier that names missing ranks and a watchdog
for collectives that stop making progress.

Start-up: Paddle's own rendezvous waits up to 15 minutes for a rank that never comes and then
fails without saying which one. Before it, rank 0 runs a small TCP rendezvous on the endpoint
Paddle's rendezvous itself uses (:func:`rendezvous_endpoint`: ``MASTER_ADDR:MASTER_PORT`` when
set, else the launcher's ``PADDLE_MASTER``), so the check needs no port that the job does not
need anyway: every rank reports in, and after ``timeout`` seconds rank 0 stops with the list of
ranks that did not, and the other ranks name the endpoint they could not reach. Rank 0 closes
the rendezvous before Paddle's store takes the port over (the other ranks close their side
first, so the port is free at once).

After start-up: a collective whose peer hangs without exiting (a deadlock, a stuck file system)
would block every rank for ever: gloo has no run-time limit and NCCL's is long. The
:class:`CollectiveWatchdog` ends this process when no training step has completed for
``PADDLE_PG_TIMEOUT`` milliseconds (the launcher's process-group timeout, Paddle's default 30
minutes; NCCL process groups read the same variable), with one line naming the rank and the last
step; the launcher then stops the whole job, as it does for a rank that died.
"""
import logging
import os
import socket
import sys
import threading
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


def rendezvous_endpoint(environ=None):
    """(host:port, where it comes from) of the rendezvous Paddle's process group uses, in
    Paddle's own order: ``MASTER_ADDR``/``MASTER_PORT``, the launcher's ``PADDLE_MASTER``, the
    first trainer endpoint; (None, None) when the environment names none."""
    environ = os.environ if environ is None else environ
    addr, port = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
    if addr and port:
        return f"{addr}:{port}", "MASTER_ADDR:MASTER_PORT"
    master = environ.get("PADDLE_MASTER", "").strip()
    if master:
        return master.split("://", 1)[-1], "PADDLE_MASTER, the launcher's rendezvous"
    first = environ.get("PADDLE_TRAINER_ENDPOINTS", "").split(",")[0].strip()
    if first:
        return first, "PADDLE_TRAINER_ENDPOINTS"
    return None, None


def init_distributed(startup_timeout=300.0):
    """Initialise the process group when launched with several processes, and arm the
    :class:`CollectiveWatchdog`. Returns DistEnv."""
    global _ENV
    env = env_from_launcher()
    if env.distributed:
        endpoint, source = rendezvous_endpoint()
        if endpoint:
            startup_barrier(env.rank, env.world_size, endpoint, startup_timeout, source)
        dist.init_parallel_env()
        CollectiveWatchdog.start(env.rank)
    _ENV = env
    return env


def startup_barrier(rank, world_size, rank0_endpoint, timeout=300.0, source=None):
    """Every rank checks in with rank 0 at ``rank0_endpoint`` (host:port); raises
    StartupTimeout naming the ranks that did not arrive within ``timeout`` seconds (rank 0) or
    the endpoint that could not be reached (the others). ``source`` says where the endpoint
    came from, for the message."""
    host, port = rank0_endpoint.rsplit(":", 1)
    port = int(port)
    deadline = time.time() + timeout
    where = f"{rank0_endpoint}" + (f" ({source})" if source else "")
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
                        f"did not join within {timeout:.0f} s (rank 0 at {where}); check that "
                        "every node was launched with the same --nnodes/--master and can reach "
                        "this port on node 0")
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
                if other in arrived and arrived[other] is not None:
                    arrived[other].close()  # a rank that retried: keep its newest connection
                arrived[other] = conn
        except BaseException:
            for conn in arrived.values():
                if conn is not None:
                    conn.close()
            raise
        finally:
            # no new connection from here on: Paddle's store takes this port over next
            server.close()
        for conn in arrived.values():
            if conn is not None:
                try:
                    conn.sendall(b"go")
                except OSError:
                    pass
        for conn in arrived.values():
            if conn is not None:
                # wait for the other side to close first, so that no TIME_WAIT holds the port
                try:
                    conn.settimeout(10)
                    while conn.recv(16):
                        pass
                except OSError:
                    pass
                conn.close()
        return
    while True:
        remaining = deadline - time.time()
        if remaining <= 0:
            raise StartupTimeout(f"start-up barrier: rank {rank} could not reach rank 0 at "
                                 f"{where} within {timeout:.0f} s; this port on node 0 must be "
                                 "reachable from every node (or set MASTER_ADDR/MASTER_PORT to "
                                 "one that is)")
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


def collective_timeout_s(environ=None):
    """The process-group timeout in seconds: ``PADDLE_PG_TIMEOUT`` (milliseconds, the variable
    the launcher and Paddle's process groups read; default 30 minutes)."""
    environ = os.environ if environ is None else environ
    raw = environ.get("PADDLE_PG_TIMEOUT", "").strip()
    try:
        value = int(raw) / 1000.0 if raw else 1800.0
    except ValueError:
        raise ValueError(f"PADDLE_PG_TIMEOUT={raw!r}: expected milliseconds (an integer)") from None
    if value <= 0:
        raise ValueError(f"PADDLE_PG_TIMEOUT={raw!r}: expected a positive number of milliseconds")
    return value


class CollectiveWatchdog:
    """Ends this process with one line when training makes no progress for
    :func:`collective_timeout_s` seconds: every completed step calls :func:`heartbeat`, and a
    daemon thread checks the time since the last one. Armed by the first heartbeat (building
    the model, reading data for the first time and resuming are not timed)."""

    _instance = None

    def __init__(self, rank, timeout_s, exit=os._exit):
        self.rank = rank
        self.timeout_s = float(timeout_s)
        self.exit = exit
        self.last = None  # time of the last heartbeat; None: not armed
        self.what = ""
        self.fired = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="collective-watchdog",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, rank, timeout_s=None, exit=os._exit):
        cls._instance = cls(rank, collective_timeout_s() if timeout_s is None else timeout_s,
                            exit)
        return cls._instance

    def beat(self, what=""):
        with self._lock:
            self.last = time.monotonic()
            self.what = what

    def _watch(self):
        while not self.fired:
            time.sleep(min(max(self.timeout_s / 20.0, 0.05), 5.0))
            with self._lock:
                stalled = self.last is not None and time.monotonic() - self.last > self.timeout_s
                what = self.what
            if stalled:
                self.fired = True
                message = (f"rank {self.rank}: no training step completed for "
                           f"{self.timeout_s:.0f} s (last: {what or 'start'}); a rank is hung "
                           "in a collective or stalled before one. Stopping this process so the "
                           "launcher ends the job (limit: PADDLE_PG_TIMEOUT, milliseconds)")
                logger.error(message)
                print(message, file=sys.stderr, flush=True)
                self.exit(3)


def heartbeat(what=""):
    """Tell the :class:`CollectiveWatchdog` that training progressed (no-op without one)."""
    watchdog = CollectiveWatchdog._instance
    if watchdog is not None:
        watchdog.beat(what)


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
