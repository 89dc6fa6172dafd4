"""fednova: local steps, then normalised averaging of the replicas' updates."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Strategy, check_every, ends_every, merge_weight


def normaliser(steps: torch.Tensor, momentum: float) -> torch.Tensor:
    """||a_i||₁ for τ_i local steps: τ_i for plain SGD; with heavy-ball momentum ρ (its buffer
    starting the round at zero) [τ − ρ(1 − ρ^τ)/(1 − ρ)] / (1 − ρ), Wang et al. 2020, §5."""
    if not momentum:
        return steps
    rho = momentum
    return (steps - rho * (1 - rho ** steps) / (1 - rho)) / (1 - rho)


@dataclass(frozen=True)
class FedNova(Strategy):
    """Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
    Federated Optimization" (FedNova). Replica i takes τ_i local steps (τ_i differs when shares
    are uneven); its update x − y_i is divided by ||a_i||₁ (τ_i for SGD, the momentum form for
    SGD with momentum) and the normalised updates are combined with p_i = nᵢ/n (samples):

        x ← x − τ_eff · Σ p_i (x − y_i)/||a_i||₁,    τ_eff = Σ p_i ||a_i||₁

    With equal local steps it is the samples-weighted mean: ``periodic`` (with momentum,
    ``periodic(optimizer_state="reset")``). Floating buffers take the weighted mean. The
    paper's momentum form assumes each round's momentum buffer starts at zero, so with momentum
    the optimizer state is reset at every merge, as the paper's clients start each round;
    keeping it made ||a_i||₁ undercount a short round's update (its buffer still carried earlier
    rounds' velocity) and diverged on powerlaw shares. For other optimizers (Adam)
    ||a_i||₁ = τ_i is used and their state is kept. Nesterov momentum is treated as heavy ball.
    Known gap: with nan="skip" or "rollback" a discarded local step still counts in the
    round's local steps.
    """

    name = "fednova"
    every: int | str = "epoch"

    def __post_init__(self) -> None:
        check_every(self.name, self.every)

    def begin(self, replica, comm):
        state = replica.strategy_state
        state["fednova.x"] = replica.state_vector()[..., :replica.num_parameters].clone()
        state["fednova.steps"] = torch.zeros(replica.local_shape, device=replica.device)

    def on_gradients(self, replica, comm, step, weight):
        # a local step, unless this replica's share is used up (then it takes none)
        replica.strategy_state["fednova.steps"] += torch.as_tensor(weight, device=replica.device) > 0
        return False

    def round_ends(self, step, epoch_end):
        return ends_every(self.every, step, epoch_end)

    def merge_replicas(self, replica, comm):
        state, n = replica.strategy_state, replica.num_parameters
        x, steps = state["fednova.x"], state["fednova.steps"]
        momentum = float(replica.optimizer.param_groups[0].get("momentum", 0.0) or 0.0)
        norm = normaliser(steps, momentum)
        y = replica.state_vector()
        safe = torch.where(norm > 0, norm, torch.ones_like(norm)).unsqueeze(-1)
        d = torch.where(norm.unsqueeze(-1) > 0, (x - y[..., :n]) / safe, torch.zeros_like(x))
        message = torch.cat([d, norm.unsqueeze(-1).to(d.dtype), y[..., n:]], dim=-1)
        mean = comm.all_reduce_mean(message, merge_weight(replica.samples_since_merge))
        tau_eff = mean[..., n:n + 1]
        x.copy_(x - tau_eff * mean[..., :n])
        distance = torch.linalg.vector_norm(y[..., :n] - x, dim=-1)
        replica.load_state_vector(torch.cat([x, mean[..., n + 1:]], dim=-1))
        replica.project()
        x.copy_(replica.state_vector()[..., :n])
        steps.zero_()
        if momentum:  # the normaliser's momentum buffer starts each round at zero
            replica.optimizer.state.clear()
        return distance
