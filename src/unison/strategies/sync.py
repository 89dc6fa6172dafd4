"""sync: gradients averaged across replicas every step (data-parallel SGD, as DDP does)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import merges
from ..errors import ConfigError
from .base import Strategy, combine_gradients, merge_states, parse_merge


@dataclass(frozen=True)
class Sync(Strategy):
    """θ ← θ − α·(1/b)·Σ∇J(θ; xᵢ, yᵢ) over the union of the replicas' batches: exactly SGD with
    batch workers·batch_size (Goyal et al. 2017, "Accurate, Large Minibatch SGD").

    ``merge`` combines the gradients: "mean" (the default, one all-reduce) or a robust rule
    such as ``krum(f=1)`` or ``median`` against faulty replicas (Blanchard et al. 2017).
    Parameters stay identical by construction; at each epoch end (a round) the floating
    buffers, such as BatchNorm statistics computed on local batches, are averaged.
    """

    name = "sync"
    merge: merges.Merge = merges.Mean()

    def __post_init__(self) -> None:
        parse_merge(self)
        if self.merge.needs_validation:
            raise ConfigError(f"{self.name}(merge={self.merge}) is not possible: {self.name} combines "
                              "gradients, and a soup combines models; use periodic or oneshot")

    def check(self, world_size, has_validation, steps):
        super().check(world_size, has_validation, steps)
        if not isinstance(self.merge, merges.Mean) and len(set(steps)) > 1:
            raise ConfigError(f"{self.spec()} needs every worker to have a batch at every step (a worker "
                              f"without one would vote for a zero gradient), but the shares give "
                              f"{min(steps)} to {max(steps)} batches per epoch; use partition='shard' or "
                              "merge='mean'")

    def on_gradients(self, replica, comm, step, weight):
        combine_gradients(replica, comm, weight, self.merge)
        return True

    def round_ends(self, step, epoch_end):
        return epoch_end

    def merge_replicas(self, replica, comm):
        return merge_states(replica, comm, parameters=False)
