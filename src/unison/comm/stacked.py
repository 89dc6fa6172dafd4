"""Collectives among replicas stacked in one process, and across processes when there are several.

A stacked replica (unison.engine.stacked) holds R replicas as tensors whose first dimension is the
replica: every tensor handed to a collective here has shape [R, ...], one row per replica. A
collective first reduces over that dimension in this process (no communication at all), then,
when several processes each hold R replicas (``replicas_per_worker``), makes one call to the
``outer`` communicator that links the processes. Replica j of process p has rank p·R + j, so a
hierarchical run's replicas line up with the ranks of a flat run of P·R workers.

``traffic`` counts what a flat run of P·R separate workers would make: one collective per call
with one row's payload (a weighted mean: the row and its weight), whatever crosses processes;
``bytes_sent`` stays what does cross them. The link model (unison.linkmodel) reads the first.
"""

from __future__ import annotations

import time

import torch

from .base import Communicator, Solo, nbytes


class StackedComm(Communicator):
    """``replicas`` rows in this process; ``outer`` (Solo when alone) for the other processes."""

    def __init__(self, replicas: int, outer: Communicator | None = None):
        self.outer = outer or Solo()
        self.replicas = replicas
        super().__init__(rank=self.outer.rank * replicas, world_size=self.outer.world_size * replicas)

    @property
    def bytes_sent(self) -> int:
        """What crosses processes, counted by ``outer``; rows of one process exchange nothing."""
        return self.outer.bytes_sent

    @bytes_sent.setter
    def bytes_sent(self, value: int) -> None:
        self.outer.bytes_sent = value

    def _row(self, kind: str, tensor: torch.Tensor) -> float:
        """Count one flat-run collective of one row of ``tensor`` (alone: none, as Solo); the
        time it starts."""
        if self.world_size > 1:
            self.traffic.count(kind, nbytes(tensor) // self.replicas)
        return time.perf_counter()

    def all_reduce_sum(self, tensor):
        started = self._row("all_reduce", tensor)
        total = tensor.sum(dim=0)
        self.outer.all_reduce_sum(total)
        tensor.copy_(total.expand_as(tensor))
        self.traffic.timed(started)
        return tensor

    def all_reduce_mean(self, tensor, weight=1.0):
        """Every row becomes sum_r(w_r·x_r) / sum_r(w_r) over all replicas; ``weight`` is one
        number per row (or one for all). This process's weighted sum and its total weight
        travel together in one all-reduce, so the outer mean is weighted by samples exactly
        as a flat run's is."""
        if self.world_size == 1:
            return tensor
        rows = tensor.reshape(self.replicas, -1)
        self.traffic.count("all_reduce", (rows.shape[1] + 1) * rows.element_size())
        started = time.perf_counter()
        weights = torch.as_tensor(weight, dtype=rows.dtype, device=rows.device).expand(self.replicas)
        buffer = torch.empty(rows.shape[1] + 1, dtype=rows.dtype, device=rows.device)
        torch.sum(rows * weights[:, None], dim=0, out=buffer[:-1])
        buffer[-1] = weights.sum()
        self.outer.all_reduce_sum(buffer)
        total = buffer[-1].clamp_min(torch.finfo(buffer.dtype).tiny)
        tensor.copy_((buffer[:-1] / total).reshape(tensor.shape[1:]).expand_as(tensor))
        self.traffic.timed(started)
        return tensor

    def all_gather(self, tensor):
        """Every replica's row, in rank order: the stacked tensor itself, split."""
        started = self._row("all_gather", tensor)
        rows = [row for part in self.outer.all_gather(tensor) for row in part.unbind(0)]
        self.traffic.timed(started)
        return rows

    def broadcast(self, tensor, src=0):
        started = self._row("broadcast", tensor)
        holder, row = divmod(src, self.replicas)
        source = tensor[row].clone()  # overwritten by the holder's on every other process
        self.outer.broadcast(source, src=holder)
        tensor.copy_(source.expand_as(tensor))
        self.traffic.timed(started)
        return tensor

    def broadcast_object(self, obj, src=0):
        return self.outer.broadcast_object(obj, src=src // self.replicas)

    def barrier(self):
        if self.world_size > 1:
            self.traffic.count("barrier", 0)
        started = time.perf_counter()
        self.outer.barrier()
        self.traffic.timed(started)
