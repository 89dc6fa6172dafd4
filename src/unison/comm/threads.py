"""Collectives among threads of one process, deterministic: rank 0 reduces in rank order.

Every rank deposits its tensor, rank 0 combines them, everyone copies the one result, so all
replicas receive bit-identical values and the outcome does not depend on thread timing.

Every wait has the run's timeout. Each rank counts the collectives it has entered, so when a
wait times out the ranks that are behind are the ones that did not arrive, and the error names
them (what gloo's monitored barrier reports for processes).
"""

from __future__ import annotations

import copy
import threading
import time

from .base import Communicator, PeerFailed, nbytes


class ThreadGroup:
    """State shared by the ThreadComms of one run."""

    def __init__(self, world_size: int, timeout: float):
        self.world_size = world_size
        self.timeout = timeout
        self.barrier = threading.Barrier(world_size)
        self.slots: list[object] = [None] * world_size
        self.result: object = None
        self.entered = [0] * world_size   # collectives each rank has entered
        self.missing: tuple[int, ...] = ()  # set by the first rank to see a timeout
        self.aborted = False
        # point to point: each rank's inbox of (sender, tensors), in arrival order
        self.inboxes: list[list[tuple[int, list]]] = [[] for _ in range(world_size)]
        self.mail = threading.Condition()
        self.arrived: dict[str, int] = {}   # arrival counters (Communicator.arrive)
        self.arrived_lock = threading.Lock()

    def abort(self) -> None:
        """Wake every waiting worker with PeerFailed (called when one worker fails)."""
        self.aborted = True
        self.barrier.abort()
        with self.mail:
            self.mail.notify_all()


class ThreadComm(Communicator):
    def __init__(self, group: ThreadGroup, rank: int):
        super().__init__(rank=rank, world_size=group.world_size)
        self.group = group

    def peer_failed(self) -> bool:
        return self.group.aborted

    def arrive(self, key):
        with self.group.arrived_lock:
            self.group.arrived[key] = self.group.arrived.get(key, 0) + 1
            return self.group.arrived[key]

    def arrivals(self, key):
        with self.group.arrived_lock:
            return self.group.arrived.get(key, 0)

    def _enter(self) -> None:
        self.group.entered[self.rank] += 1

    def _wait(self) -> None:
        group = self.group
        try:
            group.barrier.wait(group.timeout)
        except threading.BrokenBarrierError:
            mine = group.entered[self.rank]
            behind = tuple(r for r, n in enumerate(group.entered) if n < mine)
            if behind and not group.aborted and not group.missing:
                group.missing = behind
            if group.missing:
                ranks = ", ".join(str(r) for r in group.missing)
                raise PeerFailed(f"a collective timed out after {group.timeout:g} s: rank {ranks} did not "
                                 "arrive", rank=self.rank, missing=group.missing) from None
            raise PeerFailed("another worker failed or a collective timed out "
                             f"after {group.timeout:g} s", rank=self.rank) from None

    def _exchange(self, value: object, combine) -> object:
        """Deposit ``value``; rank 0 turns all deposits into one result; everyone gets it."""
        group = self.group
        self._enter()
        group.slots[self.rank] = value
        self._wait()
        if self.rank == 0:
            group.result = combine(list(group.slots))
        self._wait()
        return group.result

    def _done(self) -> None:
        """Nobody may deposit for the next collective until everyone has read this one."""
        self._wait()

    def all_reduce_sum(self, tensor):
        def total(parts):
            out = parts[0].clone()
            for part in parts[1:]:
                out += part
            return out

        self._count("all_reduce", nbytes(tensor))
        started = time.perf_counter()
        tensor.copy_(self._exchange(tensor, total))
        self._done()
        self.traffic.timed(started)
        return tensor

    def all_gather(self, tensor):
        self._count("all_gather", nbytes(tensor))
        started = time.perf_counter()
        parts = self._exchange(tensor, lambda parts: parts)
        parts = [p.clone() for p in parts]
        self._done()
        self.traffic.timed(started)
        return parts

    def broadcast(self, tensor, src=0):
        self._count("broadcast", nbytes(tensor), src)
        started = time.perf_counter()
        tensor.copy_(self._exchange(tensor, lambda parts: parts[src]))
        self._done()
        self.traffic.timed(started)
        return tensor

    def broadcast_object(self, obj, src=0):
        result = copy.deepcopy(self._exchange(obj, lambda parts: parts[src]))
        self._done()
        return result

    def barrier(self):
        self._count("barrier", 0)
        started = time.perf_counter()
        self._enter()
        self._wait()
        self.traffic.timed(started)

    def send(self, tensors, dst):
        """Deposit copies in ``dst``'s inbox; never waits (gloo's send of a small message
        does not either)."""
        self._count("send", sum(nbytes(t) for t in tensors))
        copies = [t.detach().clone() for t in tensors]
        with self.group.mail:
            self.group.inboxes[dst].append((self.rank, copies))
            self.group.mail.notify_all()

    def recv(self, tensors, src=None):
        started = time.perf_counter()
        sender = self._receive(tensors, src)
        self.traffic.timed(started)
        return sender

    def _receive(self, tensors, src):
        group, deadline = self.group, time.monotonic() + self.group.timeout
        with group.mail:
            while True:
                if group.aborted:
                    raise PeerFailed("another worker failed", rank=self.rank)
                inbox = group.inboxes[self.rank]
                found = next((i for i, (sender, _) in enumerate(inbox) if _matches(sender, src)), None)
                if found is not None:
                    sender, parts = inbox.pop(found)
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    who = "any rank" if src is None else f"rank {src}"
                    raise PeerFailed(f"a message from {who} did not arrive within {group.timeout:g} s",
                                     rank=self.rank, missing=(src,) if isinstance(src, int) else ())
                group.mail.wait(min(left, 0.5))
        for tensor, part in zip(tensors, parts, strict=True):
            tensor.copy_(part)
        return sender


def _matches(sender: int, src) -> bool:
    return src is None or (sender == src if isinstance(src, int) else sender in src)
