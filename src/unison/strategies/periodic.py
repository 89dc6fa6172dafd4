"""periodic: local SGD with parameter averaging every H steps or every epoch."""

from __future__ import annotations

from dataclasses import dataclass

from .. import compression, merges
from ..errors import ConfigError, expected
from .base import (OPTIMIZER_STATES, Strategy, check_every, check_partial_rounds, combine_gradients, ends_every,
                   merge_optimizer_state, merge_states, merge_weight, parse_compress, parse_merge)
from .compressed import merge_change

ANCHOR = "periodic.anchor"  # the parameters of the last merge, that the change is measured from


@dataclass(frozen=True)
class Periodic(Strategy):
    """Replicas train alone and are merged (parameters and floating buffers) after every
    ``every``-th optimizer step, counted across epochs, or at each epoch end with
    ``every="epoch"`` (the "simultaneous epochs" idea); a last merge ends training.

    The first ``warmup`` steps run as ``sync``: post-local SGD (Lin et al. 2020, "Don't Use
    Large Mini-Batches, Use Local SGD"). Local SGD itself: Stich 2019, "Local SGD Converges
    Fast and Communicates Little". With ``every=1`` and plain SGD it equals ``sync``.
    ``optimizer_state`` after a merge: "keep" (torch's model averaging does this), "reset",
    or "average". ``merge``: "mean" (weighted by samples) or any rule in unison.merges.
    ``compress`` (with merge=mean) sends each replica's change since the last merge compressed,
    never its weights (unison.compression); warm-up steps and optimizer state go uncompressed.
    ``min_fraction`` < 1: straggler-tolerant rounds, FedAvg's partial participation (McMahan et
    al. 2017): a round closes once ⌈min_fraction·N⌉ replicas finished its steps; the others stop
    at their current step and take part with weight 0, then start the next round from the merge.
    ``deadline`` (seconds): a round also closes that long after its first replica finished it
    (as each straggler sees at the end of its current step).
    """

    name = "periodic"
    every: int | str = "epoch"
    warmup: int = 0
    optimizer_state: str = "keep"
    merge: merges.Merge = merges.Mean()
    compress: compression.Compression = compression.NoCompression()
    min_fraction: float = 1.0
    deadline: float | None = None

    def __post_init__(self) -> None:
        check_every(self.name, self.every)
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(expected(f"{self.name}.warmup", self.warmup, "an integer >= 0 (steps)"))
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ConfigError(expected(f"{self.name}.optimizer_state", self.optimizer_state, OPTIMIZER_STATES))
        parse_merge(self)
        parse_compress(self)
        check_partial_rounds(self)

    @property
    def compressed(self) -> bool:
        return not isinstance(self.compress, compression.NoCompression)

    def begin(self, replica, comm):
        if self.compressed:
            replica.strategy_state[ANCHOR] = replica.state_vector()[..., :replica.num_parameters].clone()

    def in_warmup(self, step: int) -> bool:
        return step <= self.warmup

    def on_gradients(self, replica, comm, step, weight):
        if self.compressed and self.warmup and step == self.warmup + 1:  # local steps start here
            replica.strategy_state[ANCHOR] = replica.state_vector()[..., :replica.num_parameters].clone()
        if self.in_warmup(step):  # warm-up is plain sync: gradients averaged, whatever the merge
            combine_gradients(replica, comm, weight)
            return True
        return False

    def round_ends(self, step, epoch_end):
        if self.in_warmup(step):
            return epoch_end
        return ends_every(self.every, step - self.warmup, epoch_end)

    def merge_replicas(self, replica, comm):
        if self.in_warmup(replica.step):  # still synchronous: parameters are already equal
            return merge_states(replica, comm, parameters=False)
        if not self.compressed:
            return merge_states(replica, comm, self.merge, optimizer_state=self.optimizer_state)
        anchor = replica.strategy_state[ANCHOR]
        merged, _, distance = merge_change(replica, comm, self.compress, anchor)
        replica.load_state_vector(merged)
        replica.project()  # the next round's changes are measured from where the replicas start
        anchor.copy_(replica.state_vector()[..., :replica.num_parameters])
        merge_optimizer_state(replica, comm, self.optimizer_state, merge_weight(replica.samples_since_merge))
        return distance
