"""Collectives through torch.distributed: gloo on CPU, NCCL on CUDA.

The only module in unison that imports torch.distributed. Also holds the small helpers that
create or join a process group, so launchers never touch torch.distributed themselves.

Every collective times out after the run's ``timeout``. After a timeout the group's connections
are closed, so the ranks that did not arrive are found on a second, idle gloo group with
``monitored_barrier(wait_all_ranks=True)``: rank 0 learns exactly which ranks are missing and
its PeerFailed names them; the other ranks can only say that rank 0 knows.
"""

from __future__ import annotations

import os
import re
import time
from datetime import timedelta

import torch
import torch.distributed as dist  # (import torch has already imported it)

from ..errors import WorkerError
from .base import Communicator, Pending, PeerFailed, nbytes

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_PEER = re.compile(r"\[([0-9A-Fa-f.:]+)\]:\d+")  # gloo names the peer of a broken pair: [address]:port


# What a peer that never joined the group looks like (the store's or a connection's timeout).
_JOIN_FAILURE = re.compile(r"DistStoreError|DistNetworkError|timed? ?out|Connection (refused|reset)", re.IGNORECASE)
_MISSING = re.compile(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier")
# At most this long to find who is missing, after a timeout: the ranks still running reach the
# roll call within moments of each other (they timed out on the same collective), so a short one
# suffices, and a stopped worker is named within timeout + ~2 s.
ROLL_CALL_S = 2.0


class TorchDistComm(Communicator):
    """Communicator over the default process group."""

    def __init__(self, timeout: float = 300.0) -> None:
        super().__init__(rank=dist.get_rank(), world_size=dist.get_world_size())
        self.timeout = timeout
        # Idle until a collective times out; then it takes the roll call (see the module doc).
        self._roll_call = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        self._store = None  # the group's key-value store, for arrival counters (made on first use)

    def _counters(self):
        if self._store is None:
            self._store = dist.PrefixStore("unison/arrivals/", dist.distributed_c10d._get_default_store())
        return self._store

    def arrive(self, key):
        """One atomic add in the group's store (TCPStore): no collective, nobody waits."""
        return self._add(key, 1)

    def arrivals(self, key):
        return self._add(key, 0)

    def _add(self, key: str, amount: int) -> int:
        try:
            return int(self._counters().add(key, amount))
        except RuntimeError as exc:
            raise PeerFailed(f"the group's store is gone: {exc}", rank=self.rank) from exc

    def _collective(self, name: str, call, *args, **kwargs):
        """Run a torch.distributed call; its failure means a peer is gone or late: PeerFailed."""
        started = time.perf_counter()
        try:
            result = call(*args, **kwargs)
            self.traffic.timed(started)
            return result
        except RuntimeError as exc:  # DistBackendError and gloo's errors are RuntimeErrors
            if "timed out" not in str(exc).lower() and "timeout" not in str(exc).lower():
                peer = _PEER.search(str(exc))
                who = f"the worker at {peer.group(1)} is gone" if peer else "a peer is gone"
                raise PeerFailed(f"{name} failed, {who}: {exc}", rank=self.rank) from exc
            missing = self._who_did_not_arrive()
            if missing:
                ranks = ", ".join(str(r) for r in missing)
                raise PeerFailed(f"{name} timed out after {self.timeout:g} s: rank {ranks} did not arrive",
                                 rank=self.rank, missing=missing) from exc
            raise PeerFailed(f"{name} timed out after {self.timeout:g} s (rank 0 names the ranks that did "
                             f"not arrive): {exc}", rank=self.rank) from exc

    def _who_did_not_arrive(self) -> tuple[int, ...]:
        """Ranks missing from a monitored barrier on the idle group; () if unknown here."""
        wait = timedelta(seconds=min(self.timeout, ROLL_CALL_S))
        try:
            dist.monitored_barrier(group=self._roll_call, timeout=wait, wait_all_ranks=True)
        except RuntimeError as exc:
            found = _MISSING.search(str(exc))
            if found:
                return tuple(int(r) for r in found.group(1).replace(" ", "").split(",") if r)
        return ()

    def all_reduce_sum(self, tensor):
        self._count("all_reduce", nbytes(tensor))
        self._collective("all_reduce", dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_sum_async(self, tensor):
        self._count("all_reduce", nbytes(tensor))
        work = self._collective("all_reduce", dist.all_reduce, tensor, op=dist.ReduceOp.SUM, async_op=True)
        return _Started(self, work, tensor)

    def all_gather(self, tensor):
        self._count("all_gather", nbytes(tensor))
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._collective("all_gather", dist.all_gather, parts, tensor.contiguous())
        return parts

    def broadcast(self, tensor, src=0):
        self._count("broadcast", nbytes(tensor), src)
        self._collective("broadcast", dist.broadcast, tensor, src=src)
        return tensor

    def broadcast_object(self, obj, src=0):
        box = [obj]
        self._collective("broadcast", dist.broadcast_object_list, box, src=src)
        return box[0]

    def barrier(self):
        self._count("barrier", 0)
        self._collective("barrier", dist.barrier)

    def send(self, tensors, dst):
        """One message: each tensor in turn, its position as the tag, so that parts never mix
        (counted as one message, as on threads: the link model times one per send)."""
        self._count("send", sum(nbytes(tensor) for tensor in tensors))
        for tag, tensor in enumerate(tensors):
            self._collective("send", dist.send, tensor.contiguous(), dst=dst, tag=tag)

    def recv(self, tensors, src=None):
        """The first part from ``src`` (several or None: gloo's receive from any rank, whose
        torch.distributed.recv returns the sender), then the rest from that sender. NCCL has
        no receive from any rank, so torchrun with CUDA lacks POINT_TO_POINT."""
        src = self._collective("recv", dist.recv, tensors[0], src=src if isinstance(src, int) else None, tag=0)
        for tag, tensor in enumerate(tensors[1:], start=1):
            self._collective("recv", dist.recv, tensor, src=src, tag=tag)
        return src


class _Started(Pending):
    """An all-reduce running in torch.distributed's background; a failure surfaces at ``wait``."""

    def __init__(self, comm: TorchDistComm, work, tensor: torch.Tensor):
        super().__init__(tensor)
        self.comm, self.work = comm, work

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.comm._collective("all_reduce", self.work.wait)
            self.work = None
        return self.tensor


def _before_a_group() -> None:
    """Import torch._dynamo before any process group exists, on purpose: torch.optim imports it
    lazily at the first optimizer, and when that happens after gloo's group was created the
    interpreter often aborts at exit (SIGABRT; 3 of 8 torchrun runs here, 0 of 8 with this).
    Here, not at the top: it costs ~0.7 s that ``import unison`` and the driver need not pay."""
    import torch._dynamo  # noqa: F401


def host_store(world_size: int, timeout: float, host: str) -> dist.TCPStore:
    """A rendezvous store on ``host`` with a free port the OS picks, hosted by the caller.

    Asking the OS for the port inside the store (port 0) leaves no window in which another
    program could take a port we probed as free.
    """
    return dist.TCPStore(host, 0, world_size, is_master=True,
                         timeout=timedelta(seconds=timeout), wait_for_workers=False)


def join(rank: int, world_size: int, host: str, port: int, timeout: float) -> TorchDistComm:
    """Join the gloo group whose store the launcher hosts on ``host``:``port``."""
    _before_a_group()
    store = dist.TCPStore(host, port, world_size, is_master=False,
                          timeout=timedelta(seconds=timeout))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout))
    return TorchDistComm(timeout)


def torchrun_environment() -> dict[str, str] | None:
    """torchrun's variables if this process was started by torchrun, else None."""
    if all(name in os.environ for name in TORCHRUN_VARIABLES):
        return {name: os.environ[name] for name in TORCHRUN_VARIABLES}
    return None


def join_from_environment(timeout: float) -> tuple[TorchDistComm, torch.device, bool]:
    """Join (or reuse) the group torchrun describes: NCCL when CUDA is present, else gloo.

    Returns the communicator, this rank's device, and whether the group was created here
    (and so is ours to destroy at the end).
    """
    if torch.cuda.is_available():
        local_rank, per_node = int(os.environ.get("LOCAL_RANK", "0")), os.environ.get("LOCAL_WORLD_SIZE", "1")
        if local_rank >= torch.cuda.device_count():  # NCCL refuses two ranks on one device
            raise WorkerError(f"torchrun started {per_node} processes on this node (--nproc-per-node), and it "
                              f"has {torch.cuda.device_count()} CUDA device(s); NCCL needs one device per "
                              f"process: pass --nproc-per-node {torch.cuda.device_count()}, or hide the "
                              "devices (CUDA_VISIBLE_DEVICES=) to train on CPU with gloo", rank=local_rank)
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    created = not dist.is_initialized()
    try:
        if created:
            _before_a_group()
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout), **_attempt_store(timeout))
        return TorchDistComm(timeout), device, created
    except RuntimeError as exc:  # DistStoreError and gloo's connection errors: a peer never joined
        if not _JOIN_FAILURE.search(f"{type(exc).__name__}: {exc}"):
            raise  # a genuine NCCL/CUDA or configuration error, as raised
        rank, size = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
        raise PeerFailed(f"rank {rank} could not form the group of {size} processes within {timeout:g} s "
                         f"(timeout): a host or process did not join, or left while it formed; "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                         rank=int(rank) if rank.isdigit() else None) from exc


def _attempt_store(timeout: float) -> dict:
    """The store of this torchrun attempt, with keys of its own.

    torchrun's agent hosts one store for all restarts of a group and torch's env:// rendezvous
    adds no per-attempt prefix, so a restarted group could read the first attempt's (dead)
    addresses and fail to connect. Prefixing the keys with the restart count rules that out.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}  # rank 0 hosts a fresh store each attempt: nothing stale to read
    env = torchrun_environment()
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]), is_master=False,
                          timeout=timedelta(seconds=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"unison/attempt-{attempt}/", store), "rank": int(env["RANK"]),
            "world_size": int(env["WORLD_SIZE"])}


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
