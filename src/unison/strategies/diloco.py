"""diloco: local steps of an inner optimizer, then an outer Nesterov step on the mean change."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import merges
from ..errors import ConfigError, expected
from .base import Strategy, check_every, combined, merge_weight, parse_merge


@dataclass(frozen=True)
class DiLoCo(Strategy):
    """Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of Language
    Models" (arXiv 2311.08105). Every replica takes ``every`` steps of the run's optimizer
    (the inner one; Adam(W) in the paper) from the global parameters θ; then the replicas'
    states are merged (``merge``, by default the samples-weighted mean) and an outer SGD with
    Nesterov momentum steps on the pseudo-gradient Δ = θ − merged:

        θ ← OuterSGD(θ, Δ; lr=outer_lr, momentum=outer_momentum, nesterov)

    With outer_lr=1 and outer_momentum=0 the outer step lands on the merge itself, so it
    equals ``periodic`` with the same ``every``. Floating buffers (BatchNorm statistics) take
    the merged value directly; the inner optimizers keep their state, as in the paper.
    """

    name = "diloco"
    every: int | str = "epoch"
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    merge: merges.Merge = merges.Mean()

    def __post_init__(self) -> None:
        check_every(self.name, self.every)
        lr, momentum = self.outer_lr, self.outer_momentum
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
            raise ConfigError(expected("diloco.outer_lr", lr, "a finite number > 0"))
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ConfigError(expected("diloco.outer_momentum", momentum, "a number in [0, 1)"))
        if not isinstance(self.nesterov, bool):
            raise ConfigError(expected("diloco.nesterov", self.nesterov, "true or false"))
        parse_merge(self)

    def begin(self, replica, comm):
        # The outer optimizer holds the global parameters θ as one flat tensor; every replica
        # keeps an identical copy, so the outer step needs no communication of its own
        # (stacked replicas keep one row each: [R, P], stepped elementwise).
        theta = torch.nn.Parameter(replica.state_vector()[..., :replica.num_parameters].clone())
        outer = torch.optim.SGD([theta], lr=self.outer_lr, momentum=self.outer_momentum,
                                nesterov=self.nesterov and self.outer_momentum > 0)
        replica.strategy_state[self.name] = (theta, outer)

    def round_ends(self, step, epoch_end):
        if self.every == "epoch":
            return epoch_end
        return not epoch_end and step % self.every == 0

    def merge_replicas(self, replica, comm):
        theta, outer = replica.strategy_state[self.name]
        n = replica.num_parameters
        state = replica.state_vector()
        merged = combined(replica, comm, self.merge, state, merge_weight(replica.samples_since_merge))
        distance = torch.linalg.vector_norm(state[..., :n] - merged[..., :n], dim=-1)
        theta.grad = theta.detach() - merged[..., :n]   # the pseudo-gradient
        outer.step()
        merged[..., :n] = theta.detach()
        replica.load_state_vector(merged)
        replica.project()  # projected outer SGD: θ itself stays inside the constraint set
        with torch.no_grad():
            theta.copy_(replica.state_vector()[..., :n])
        return distance
