"""sync: gradients averaged across replicas every step (data-parallel SGD, as DDP does)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Strategy, all_reduce_gradients, average


@dataclass(frozen=True)
class Sync(Strategy):
    """θ ← θ − α·(1/b)·Σ∇J(θ; xᵢ, yᵢ) over the union of the replicas' batches: exactly SGD with
    batch workers·batch_size (Goyal et al. 2017, "Accurate, Large Minibatch SGD").

    Parameters stay identical by construction; at each epoch end (a round) the floating
    buffers, such as BatchNorm statistics computed on local batches, are averaged.
    """

    name = "sync"

    def on_gradients(self, replica, comm, step, weight):
        all_reduce_gradients(replica, comm, weight)
        return True

    def round_ends(self, step, epoch_end):
        return epoch_end

    def merge(self, replica, comm):
        return average(replica, comm, parameters=False)
