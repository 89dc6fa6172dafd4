"""fedprox: local steps with a proximal term towards the last merged model, then the mean."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError, expected
from .base import Strategy, check_every, ends_every, merge_states


@dataclass(frozen=True)
class FedProx(Strategy):
    """Li et al. 2020, "Federated Optimization in Heterogeneous Networks" (FedProx). Each local
    step minimises J(w) + (mu/2)·||w − w_global||², w_global the last merged model: the term's
    gradient mu·(w − w_global) is added to every local gradient before the optimizer steps.
    Replicas are merged every ``every`` steps (or each epoch) by the samples-weighted mean,
    as ``periodic``; with ``mu=0`` it equals ``periodic``.

    Differences: the paper lets clients stop early (γ-inexact solutions, variable work); here
    every replica takes the steps its share gives. Flower's FedProx (flwr/server/strategy/fedprox.py)
    aggregates as FedAvg and leaves the term to the client; the example loss in its docstring
    (the version read) adds (mu/2)·Σ_layers ||w − w_global||₂, unsquared, whose gradient is
    not the paper's mu·(w − w_global).
    """

    name = "fedprox"
    mu: float = 0.01
    every: int | str = "epoch"

    def __post_init__(self) -> None:
        mu = self.mu
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not (mu >= 0 and math.isfinite(mu)):
            raise ConfigError(expected("fedprox.mu", mu, "a finite number >= 0"))
        check_every(self.name, self.every)

    def begin(self, replica, comm):
        replica.strategy_state["fedprox.anchor"] = replica.state_vector()[..., :replica.num_parameters].clone()

    def on_gradients(self, replica, comm, step, weight):
        if self.mu:  # (a replica whose share is used up takes no step)
            anchor = replica.strategy_state["fedprox.anchor"]
            w = replica.state_vector()[..., :replica.num_parameters]
            replica.load_grad_vector(replica.grad_vector() + self.mu * (w - anchor))
        return False

    def round_ends(self, step, epoch_end):
        return ends_every(self.every, step, epoch_end)

    def merge_replicas(self, replica, comm):
        distance = merge_states(replica, comm)
        replica.strategy_state["fedprox.anchor"] = replica.state_vector()[..., :replica.num_parameters].clone()
        return distance
