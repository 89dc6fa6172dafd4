"""scaffold: local steps corrected by control variates, then the mean update (Algorithm 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError, expected
from .base import Strategy, check_every, ends_every
from .fednova import normaliser

INITS = ("zero", "gradient")


@dataclass(frozen=True)
class Scaffold(Strategy):
    """Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
    Learning", Algorithm 1, full participation (|S| = N), option II for the client control
    variates. From the global x, replica i takes K_i local steps on g − c_i + c; then

        c_i⁺ = c_i − c + (x − y_i)/(K_i·η_l)
        x ← x + η_g·mean_i(y_i − x),    c ← c + mean_i(c_i⁺ − c_i)

    (plain means, as in the paper: not weighted by samples). With SGD-momentum ρ, K_i is
    replaced by FedNova's ||a_i||₁ (unison.strategies.fednova.normaliser; K_i when ρ = 0):
    the paper's K_i·η_l assumes plain SGD, and with ρ = 0.9 it overstates the mean gradient
    about tenfold, which diverged on digits. η_l is the mean of the lrs of the replica's
    steps in the round (K_i·η_l is their sum: under a schedule the round's lrs differ);
    ``global_lr`` is η_g. Every control variate starts at zero (``init="zero"``, the
    Algorithm's own start; c stays the mean of the c_i, so with zero starts c = mean c_i
    holds from the first round). Floating buffers take the plain mean. The control variates
    live in strategy_state, so checkpoints carry them.

    Known gap: with nan="skip" or "rollback" a discarded local step still counts in the
    round's local steps.
    ``init="gradient"`` starts each c_i at its replica's full gradient at x over its first
    epoch's share (one extra pass before step 1) and c at their plain mean. Which start the
    paper's experiments use was not confirmed for this docstring (Algorithm 1 takes the
    control variates as inputs).
    """

    name = "scaffold"
    every: int | str = "epoch"
    global_lr: float = 1.0
    init: str = "zero"

    def __post_init__(self) -> None:
        check_every(self.name, self.every)
        lr = self.global_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
            raise ConfigError(expected("scaffold.global_lr", lr, "a finite number > 0"))
        if self.init not in INITS:
            raise ConfigError(expected("scaffold.init", self.init, INITS))

    def begin(self, replica, comm):
        x = replica.state_vector()[..., :replica.num_parameters].clone()
        replica.strategy_state.update({
            "scaffold.x": x, "scaffold.c": torch.zeros_like(x), "scaffold.ci": torch.zeros_like(x),
            "scaffold.steps": torch.zeros(replica.local_shape, device=replica.device),
            # the round's lrs: each step records the lr then in the optimizer, its previous
            # step's (the schedule sets a step's lr in the step itself); merge_replicas shifts it
            "scaffold.lr_sum": torch.zeros(replica.local_shape, dtype=torch.float64, device=replica.device),
            "scaffold.first_lr": torch.zeros(replica.local_shape, dtype=torch.float64, device=replica.device)})

    @property
    def needs_start_gradient(self) -> bool:
        return self.init == "gradient"

    def start_gradient(self, replica, comm, gradient):
        state = replica.strategy_state
        state["scaffold.ci"] = gradient.clone()
        ones = torch.ones(replica.local_shape, device=replica.device) if replica.local_shape else 1.0
        state["scaffold.c"] = comm.all_reduce_mean(gradient.clone(), ones)

    def on_gradients(self, replica, comm, step, weight):
        state = replica.strategy_state
        replica.load_grad_vector(replica.grad_vector() - state["scaffold.ci"] + state["scaffold.c"])
        stepped = torch.as_tensor(weight, device=replica.device) > 0
        lr = float(replica.optimizer.param_groups[0]["lr"])
        first = stepped & (state["scaffold.steps"] == 0)
        state["scaffold.first_lr"] = torch.where(first, lr, state["scaffold.first_lr"])
        state["scaffold.lr_sum"] += stepped * lr
        state["scaffold.steps"] += stepped
        return False

    def round_ends(self, step, epoch_end):
        return ends_every(self.every, step, epoch_end)

    def merge_replicas(self, replica, comm):
        state, n = replica.strategy_state, replica.num_parameters
        x, c, ci, steps = state["scaffold.x"], state["scaffold.c"], state["scaffold.ci"], state["scaffold.steps"]
        last_lr = float(replica.optimizer.param_groups[0]["lr"])  # the round's last step's
        lr_sum = state["scaffold.lr_sum"] - state["scaffold.first_lr"] + last_lr * (steps > 0)
        mean_lr = (lr_sum / steps.clamp(min=1)).to(x.dtype).unsqueeze(-1)
        momentum = float(replica.optimizer.param_groups[0].get("momentum", 0.0) or 0.0)
        y = replica.state_vector()
        k = normaliser(steps, momentum).unsqueeze(-1)
        # a replica that took no step this round keeps its c_i (its update is zero)
        ci_new = torch.where(k > 0, ci - c + (x - y[..., :n]) / (k.clamp(min=1) * mean_lr.clamp(min=1e-30)), ci)
        message = torch.cat([y[..., :n] - x, ci_new - ci, y[..., n:]], dim=-1)
        mean = comm.all_reduce_mean(message, torch.ones(replica.local_shape, device=replica.device)
                                    if replica.local_shape else 1.0)
        distance = torch.linalg.vector_norm(y[..., :n] - (x + mean[..., :n]), dim=-1)
        x.add_(self.global_lr * mean[..., :n])
        c.add_(mean[..., n:2 * n])
        ci.copy_(ci_new)
        replica.load_state_vector(torch.cat([x, mean[..., 2 * n:]], dim=-1))
        replica.project()
        x.copy_(replica.state_vector()[..., :n])
        steps.zero_()
        state["scaffold.lr_sum"].zero_()
        return distance
