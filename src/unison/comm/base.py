"""The communicator: the only way replicas talk to each other.

Strategies see this narrow interface and nothing else, so the same strategy runs on threads,
processes, torchrun or stacked replicas.

``bytes_sent`` (a record's ``comm_bytes``) is measured from the tensors each collective is
handed, at their real size and dtype: B = numel · element_size, so compressed exchanges count
what they send (fp16: 2 bytes a value; int8: 1 byte a value + float32 scales; topk: float32
values + int32 indices, all-gathered; powersgd: the P and Q factors; see
strategies/compressed.py). Per worker and collective: all-reduce 2(N-1)/N·B (the ring
algorithm's figure, which gloo's and NCCL's ring all-reduce send; on threads, what a ring would
send over a network), all-gather (N-1)·B, broadcast B on the source, send B on the sender. Stacked rows of one
process send nothing; unison's own bookkeeping is not counted (``uncounted``).

``traffic`` (a record's ``collectives``, ``bookkeeping`` and ``comm_s``, for the link model in
unison.linkmodel) counts the collectives themselves: per kind, the calls and their payload B
(the tensor handed in, per worker), the strategy's apart from unison's bookkeeping, and the
seconds this rank spent inside collectives (waiting for a slower peer included; on CUDA, NCCL
returns once the work is queued, so there it is the launch time only). No extra collective.
"""

from __future__ import annotations

import copy
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import TypeVar

import torch

from ..errors import WorkerError

T = TypeVar("T")


class PeerFailed(WorkerError):
    """Raised in a worker when a collective fails because a peer failed, vanished or did not
    arrive in time. A symptom, not the root cause: launchers report the peer's failure first.
    ``missing``: the ranks found not to have arrived at a collective that timed out, if known."""

    def __init__(self, message: str, *, rank: int | None = None, cause: str | None = None,
                 missing: tuple[int, ...] = ()):
        super().__init__(message, rank=rank, cause=cause)
        self.missing = tuple(missing)


class Traffic:
    """The collectives one rank made since the last ``take()``: per kind [calls, payload bytes],
    the strategy's and (inside ``uncounted``) unison's bookkeeping, and seconds spent inside."""

    KINDS = ("all_reduce", "all_gather", "broadcast", "barrier", "send")  # what unison.linkmodel models

    def __init__(self) -> None:
        self.strategy: dict[str, list[int]] = {}
        self.bookkeeping: dict[str, list[int]] = {}
        self.seconds = 0.0
        self.uncounted = 0  # depth of nested ``uncounted`` blocks

    def count(self, kind: str, nbytes: int) -> None:
        entry = (self.bookkeeping if self.uncounted else self.strategy).setdefault(kind, [0, 0])
        entry[0] += 1
        entry[1] += int(nbytes)

    def timed(self, started: float) -> None:
        """Add the time since ``started`` (a time.perf_counter() reading)."""
        self.seconds += time.perf_counter() - started

    def take(self) -> dict:
        """What was counted, as a record's fields; the counts start again from zero."""
        taken = {"comm_s": self.seconds, "collectives": self.strategy}
        if self.bookkeeping:
            taken["bookkeeping"] = self.bookkeeping
        self.strategy, self.bookkeeping, self.seconds = {}, {}, 0.0
        return taken


class Communicator(ABC):
    """Collectives among ``world_size`` workers; every rank must make the same calls in order."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self.bytes_sent = 0
        self.traffic = Traffic()

    @abstractmethod
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Replace ``tensor`` in place by the element-wise sum over ranks; return it."""

    def all_reduce_sum_async(self, tensor: torch.Tensor) -> "Pending":
        """Start ``all_reduce_sum(tensor)`` and return at once; the handle's ``wait()`` returns
        ``tensor`` holding the sum. Leave ``tensor`` alone until then. Started collectives still
        count in the one order every rank keeps. Here the sum is taken at once (threads, solo,
        stacked); torch.distributed runs it in the background (``async_op=True``)."""
        return Pending(self.all_reduce_sum(tensor))

    @abstractmethod
    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape everywhere), in rank order."""

    @abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` in place with rank ``src``'s; return it."""

    @abstractmethod
    def broadcast_object(self, obj: T, src: int = 0) -> T:
        """Rank ``src``'s picklable object, on every rank."""

    @abstractmethod
    def barrier(self) -> None:
        """Return once every rank has arrived."""

    # ---- point to point (asynchronous strategies: unison.engine.asynchronous) ----
    # A message is a list of tensors, sent and received whole; between two ranks messages
    # arrive in the order they were sent. Only backends that offer POINT_TO_POINT implement it.

    def send(self, tensors: list[torch.Tensor], dst: int) -> None:
        """Send one message (``tensors``, in order) to rank ``dst``."""
        raise NotImplementedError(f"{type(self).__name__} has no point-to-point messages")

    def recv(self, tensors: list[torch.Tensor], src: int | tuple[int, ...] | None = None) -> int:
        """Receive one message into ``tensors`` (shapes and dtypes as sent) from rank ``src``,
        or from whichever of the ranks ``src`` (a tuple; None: any) sends first; return the
        sender. Ranks outside a tuple must not be sending to this one meanwhile."""
        raise NotImplementedError(f"{type(self).__name__} has no point-to-point messages")

    def arrive(self, key: str) -> int:
        """Count this worker as arrived under ``key`` (without waiting for anyone); return how
        many have arrived there so far. For rounds that close when enough workers finished."""
        raise NotImplementedError(f"{type(self).__name__} has no arrival counter")

    def arrivals(self, key: str) -> int:
        """How many workers have arrived under ``key`` so far; never waits."""
        raise NotImplementedError(f"{type(self).__name__} has no arrival counter")

    def peer_failed(self) -> bool:
        """Whether another worker is known to have failed already (without communicating).
        Lets a replica between collectives stop early; False where the launcher stops it."""
        return False

    def all_reduce_mean(self, tensor: torch.Tensor, weight: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Replace ``tensor`` by sum_r(w_r·x_r) / sum_r(w_r), in one collective; return it.

        The weight rides along as one extra element, so uneven shares cost no second
        collective. If every weight is zero the result is zero rather than NaN.
        """
        if self.world_size == 1:
            return tensor
        flat = tensor.reshape(-1)
        buffer = torch.empty(flat.numel() + 1, dtype=flat.dtype, device=flat.device)
        torch.mul(flat, weight, out=buffer[:-1])
        buffer[-1] = weight
        self.all_reduce_sum(buffer)
        total = buffer[-1].clamp_min(torch.finfo(buffer.dtype).tiny)
        flat.copy_(buffer[:-1] / total)
        return tensor

    def _count(self, kind: str, nbytes: int, src: int = 0) -> None:
        self.traffic.count(kind, nbytes)
        n = self.world_size
        if kind == "all_reduce":
            self.bytes_sent += 2 * (n - 1) * nbytes // n
        elif kind == "all_gather":
            self.bytes_sent += (n - 1) * nbytes
        elif kind == "broadcast" and self.rank == src:
            self.bytes_sent += nbytes
        elif kind == "send":
            self.bytes_sent += nbytes


class Pending:
    """The handle of a started collective: ``wait()`` blocks until it is done, returns its tensor."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def wait(self) -> torch.Tensor:
        return self.tensor


class Solo(Communicator):
    """One worker: every collective is the identity and sends nothing."""

    def __init__(self) -> None:
        super().__init__(rank=0, world_size=1)
        self._arrived: dict[str, int] = {}

    def arrive(self, key):
        self._arrived[key] = self._arrived.get(key, 0) + 1
        return self._arrived[key]

    def arrivals(self, key):
        return self._arrived.get(key, 0)

    def all_reduce_sum(self, tensor):
        return tensor

    def all_gather(self, tensor):
        return [tensor.clone()]

    def broadcast(self, tensor, src=0):
        return tensor

    def broadcast_object(self, obj, src=0):
        return copy.deepcopy(obj)

    def barrier(self):
        return None


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@contextmanager
def uncounted(comm: Communicator):
    """Collectives made inside do not add to ``bytes_sent``: unison's own bookkeeping (the
    non-finite flag, checkpoint gathers) is not the strategy's traffic that comm_bytes reports."""
    before = comm.bytes_sent
    comm.traffic.uncounted += 1  # counted apart, as bookkeeping, for the link model
    try:
        yield comm
    finally:
        comm.bytes_sent = before
        comm.traffic.uncounted -= 1
