"""Gradient buckets: sync's all-reduce overlapped with the backward pass, as DDP does it.

Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training"
(VLDB): the parameters are grouped, in reverse order, into buckets of about ``bucket_mb`` MiB
(the first capped at 1 MiB, so that communication starts early, as DDP's first bucket), since
the backward pass produces gradients roughly from the last layer to the first. Once every
gradient of a bucket is final (``ReplicaView.watch_gradients``), its all-reduce starts in the
background while autograd computes the rest; buckets start in one order on every rank.

What travels is exactly what ``Communicator.all_reduce_mean`` sends, cut into pieces: each
replica's w·g (w its batch size, 0 when its share is used up) and, in the first bucket, w. The
result Σ w_r·g_r / Σ w_r is the same arithmetic element for element, so overlapped sync equals
sync after the backward pass (to the last bit on threads and on 2 processes; see below for
−0.0) and sends the same bytes (per collective, the ring's 2(N-1)/N·B rounds down: a few
bytes fewer where N does not divide 2(N-1)·B). Each bucket is divided by Σ w_r as it arrives, while later ones travel.

The last bucket (the first parameter's, whose gradient comes last) starts after the backward
pass, in ``finish``: the non-finite guard folds the loss into that parameter's first element
before the exchange (engine/guard.py), and the fold must travel (where parameter 0 is empty,
the first parameter with elements carries it, and its bucket and those after start there). So
does a bucket that the pass did not reach in full (an unused layer), and every bucket after it.

The mean stays in the buffer and becomes the gradients (``ReplicaView.lend_grad_buffer``, DDP's
``gradient_as_bucket_view``); the replica drops them before its next pass (as
``zero_grad(set_to_none=True)``), so autograd writes each gradient fresh and the hooks scale it
into the buffer: per step one pass to scale, one to divide, none to zero a gradient buffer, add
the pass's gradients into it or copy the mean out. Where the parameters are not all of one
dtype and contiguous, the buffer cannot be their gradients: they get a copy of the mean
(``load_grad_vector``), and the guard sums them one by one. A gradient element of −0.0 stays
−0.0 here, where the exchange after the pass adds it to zeros (+0.0): the one difference from
that path, invisible to ``==``.
"""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..comm.base import Communicator, Pending
    from ..engine.view import ReplicaView

MIB = 1 << 20
DEFAULT_MB = 25.0      # DDP's bucket_cap_mb
FIRST_BUCKET_MB = 1.0  # DDP's first bucket (torch.distributed's _DEFAULT_FIRST_BUCKET_BYTES)

# Each watched replica's buckets. Weak on both sides: a run's replicas and buffers go with it.
_WATCHED: "weakref.WeakKeyDictionary[ReplicaView, GradientBuckets]" = weakref.WeakKeyDictionary()


def assign(sizes: list[int], element_size: int, bucket_mb: float) -> list[list[int]]:
    """Parameter indices per bucket, last parameter first: a bucket closes once it holds at
    least its cap (1 MiB for the first, ``bucket_mb`` MiB after), as DDP assigns them."""
    caps = [min(FIRST_BUCKET_MB, bucket_mb) * MIB, bucket_mb * MIB]
    buckets, current, size = [], [], 0
    for i in reversed(range(len(sizes))):
        current.append(i)
        size += sizes[i] * element_size
        if size >= caps[min(len(buckets), 1)]:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


def watch(replica: "ReplicaView", comm: "Communicator", bucket_mb: float) -> bool:
    """Start overlapping this replica's gradient exchange with its backward pass; False where
    the replica cannot be watched (then the exchange follows the backward pass)."""
    if not replica.trainable:
        return False
    buckets = GradientBuckets(replica, comm, bucket_mb)
    if not replica.watch_gradients(buckets.ready):
        return False
    _WATCHED[replica] = buckets
    return True


def watched(replica: "ReplicaView") -> "GradientBuckets | None":
    return _WATCHED.get(replica)


class GradientBuckets:
    """One replica's buckets: one buffer [g_0, ..., g_P-1, w], each bucket a slice of it."""

    def __init__(self, replica: "ReplicaView", comm: "Communicator", bucket_mb: float):
        self.comm = comm
        self._replica = weakref.ref(replica)  # the replica's hooks hold this object, not the reverse
        sizes = [p.numel() for p in replica.trainable]
        dtype = functools.reduce(torch.promote_types, [p.dtype for p in replica.trainable])
        self.size = sum(sizes)
        self.buffer = torch.zeros(self.size + 1, dtype=dtype, device=replica.device)
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + size)
        self.spans = list(zip(starts[:-1], starts[1:]))        # parameter i's slice of the buffer
        self.buckets = assign(sizes, self.buffer.element_size(), bucket_mb)
        self.bucket_of = {i: b for b, members in enumerate(self.buckets) for i in members}
        # where the guard folds the loss (the first parameter with elements; the last bucket but
        # for empty parameters): from its bucket on, every bucket starts after the pass
        carrier = next((i for i, size in enumerate(sizes) if size), 0)
        self.after_pass = self.bucket_of[carrier]
        # the mean can be the gradients themselves (lend_grad_buffer) where they all fit its dtype
        self.lendable = all(p.dtype == dtype and p.is_contiguous() for p in replica.trainable)
        # bucket b: buffer[lo:hi]; the first one up to the end, so that it carries w
        self.slices = [slice(self.spans[min(m)][0], self.size + 1 if b == 0 else self.spans[max(m)][1])
                       for b, m in enumerate(self.buckets)]
        self._reset()

    def _reset(self) -> None:
        self.waiting = [len(members) for members in self.buckets]  # gradients not yet final
        self.started: list[Pending] = []                           # handles, in bucket order

    @torch.no_grad()
    def ready(self, i: int, samples: int) -> None:
        """Called by the backward pass when trainable parameter ``i``'s gradient is final."""
        replica = self._replica()
        b = self.bucket_of[i]
        if replica is None or b >= self.after_pass:
            return  # started in finish (see the module doc)
        self._copy(replica, i, samples)
        self.waiting[b] -= 1
        while len(self.started) < self.after_pass and self.waiting[len(self.started)] == 0:
            self._start(len(self.started), samples)

    def _copy(self, replica: "ReplicaView", i: int, weight: float) -> None:
        grad, (lo, hi) = replica.trainable[i].grad, self.spans[i]
        if grad is None:  # a missing gradient counts as zeros, as grad_vector has it
            self.buffer[lo:hi].zero_()
        else:
            torch.mul(grad.reshape(-1), float(weight), out=self.buffer[lo:hi])

    def _start(self, b: int, weight: float) -> None:
        if b == 0:
            self.buffer[-1] = float(weight)
        self.started.append(self.comm.all_reduce_sum_async(self.buffer[self.slices[b]]))

    @torch.no_grad()
    def finish(self, replica: "ReplicaView", weight: float) -> None:
        """After the backward pass: start what is left, then, bucket by bucket as each arrives,
        set the gradients to the weighted mean Σ w_r·g_r / Σ w_r (``weight``: this replica's
        batch size, 0 without one); the first bucket, with Σ w_r, arrives first."""
        for b in range(len(self.started), len(self.buckets)):
            for i in self.buckets[b]:  # again, where the hooks copied some: the same values
                self._copy(replica, i, weight)
            self._start(b, weight)
        total = None
        for b, pending in enumerate(self.started):
            pending.wait()
            if total is None:
                total = self.buffer[-1].clamp_min(torch.finfo(self.buffer.dtype).tiny)
            if self.lendable:  # while the later buckets are still on their way
                self.buffer[self.slices[b].start:min(self.slices[b].stop, self.size)].div_(total)
        self._reset()
        if self.lendable:
            replica.lend_grad_buffer(self.buffer[:-1])
        else:
            replica.load_grad_vector(self.buffer[:-1] / total)
