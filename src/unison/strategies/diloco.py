"""diloco: local steps of an inner optimizer, then an outer Nesterov step on the mean change."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import compression, merges
from ..errors import ConfigError, expected
from .base import (Strategy, check_every, check_partial_rounds, combined, ends_every, merge_weight, parse_compress,
                   parse_merge)
from .compressed import merge_change
from .yogi import Yogi

OUTERS = ("sgd", "adam", "adamw", "yogi")
# FedOpt's server moments (Reddi et al. 2021): β₁ 0.9, β₂ 0.99, τ 1e-3.
FEDOPT_BETAS, FEDOPT_EPS = (0.9, 0.99), 1e-3


@dataclass(frozen=True)
class DiLoCo(Strategy):
    """Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of Language
    Models" (arXiv 2311.08105). Every replica takes ``every`` steps of the run's optimizer
    (the inner one; Adam(W) in the paper) from the global parameters θ; then the replicas'
    states are merged (``merge``, by default the samples-weighted mean) and an outer SGD with
    Nesterov momentum steps on the pseudo-gradient Δ = θ − merged:

        θ ← OuterSGD(θ, Δ; lr=outer_lr, momentum=outer_momentum, nesterov)

    The outer step is torch.optim.SGD itself, stepping θ with Δ as its gradient (as torchft's
    DiLoCo does).

    Defaults: the paper's outer lr 0.7 with Nesterov, but outer momentum 0.5, not its 0.9. The
    paper runs thousands of rounds with AdamW inside; with few rounds and SGD-momentum inner
    steps (unison's default comparison: 20 rounds on digits), 0.9 oscillates and diverges
    (README, "Choosing diloco's outer step"). Long runs can set outer_momentum=0.9.

    With outer_lr=1 and outer_momentum=0 the outer step lands on the merge itself, so it
    equals ``periodic`` with the same ``every``. Floating buffers (BatchNorm statistics) take
    the merged value directly; the inner optimizers keep their state, as in the paper.

    ``compress`` (with merge=mean) sends each replica's pseudo-gradient θ − θᵢ compressed,
    never its weights (unison.compression); Δ is then the mean of the decompressed ones.

    ``outer``: "sgd" (the above; outer_momentum and nesterov apply to it only), or FedOpt's
    adaptive server steps (Reddi et al. 2021, "Adaptive Federated Optimization") on the same
    pseudo-gradient with lr=outer_lr: "adam" (torch.optim.Adam, FedAdam), "adamw"
    (torch.optim.AdamW, its default weight decay 0.01) or "yogi" (unison.strategies.yogi,
    FedYogi), with the paper's β₁ 0.9, β₂ 0.99, τ (eps) 1e-3. Differences: torch's Adam
    applies bias correction and the paper's FedAdam does not, and torch adds eps outside the
    square root as the paper does. Flower's FedAdam (flwr/server/strategy/fedadam.py, the
    version read) follows the paper without bias correction, with defaults eta 0.1, tau 1e-9,
    β 0.9/0.99. The outer moments and step count live in strategy_state (checkpointed).

    ``min_fraction`` < 1: as in ``periodic``, a round closes once ⌈min_fraction·N⌉ replicas
    finished it (or ``deadline`` seconds after the first did), and the pseudo-gradient is the
    mean over those (stragglers weigh 0).
    """

    name = "diloco"
    every: int | str = "epoch"
    outer_lr: float = 0.7
    outer_momentum: float = 0.5
    nesterov: bool = True
    merge: merges.Merge = merges.Mean()
    compress: compression.Compression = compression.NoCompression()
    outer: str = "sgd"
    min_fraction: float = 1.0
    deadline: float | None = None

    def __post_init__(self) -> None:
        check_every(self.name, self.every)
        if self.outer not in OUTERS:
            raise ConfigError(expected("diloco.outer", self.outer, OUTERS))
        lr, momentum = self.outer_lr, self.outer_momentum
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
            raise ConfigError(expected("diloco.outer_lr", lr, "a finite number > 0"))
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ConfigError(expected("diloco.outer_momentum", momentum, "a number in [0, 1)"))
        if not isinstance(self.nesterov, bool):
            raise ConfigError(expected("diloco.nesterov", self.nesterov, "true or false"))
        parse_merge(self)
        parse_compress(self)
        check_partial_rounds(self)

    def begin(self, replica, comm):
        # The global parameters θ and the outer momentum, identical on every rank (so the outer
        # step needs no communication of its own), kept as plain tensors in strategy_state so
        # that checkpoints save and restore them.
        theta = replica.state_vector()[..., :replica.num_parameters].clone()
        state = {"diloco.theta": theta, "diloco.momentum": torch.zeros_like(theta)}
        if self.outer in ("adam", "adamw"):
            state |= {"diloco.exp_avg": torch.zeros_like(theta), "diloco.exp_avg_sq": torch.zeros_like(theta),
                      "diloco.step": torch.zeros((), dtype=torch.float32, device=theta.device)}
        elif self.outer == "yogi":
            state |= {"diloco.exp_avg": torch.zeros_like(theta),
                      "diloco.exp_avg_sq": torch.full_like(theta, FEDOPT_EPS ** 2)}
        replica.strategy_state.update(state)

    def outer_optimizer(self, theta: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.optim.Optimizer:
        """The outer torch optimizer over θ. Its state tensors are strategy_state's, which it
        updates in place; SGD's momentum buffer starts at zero, so the first step makes it Δ,
        as torch's own first step does."""
        if self.outer == "sgd":
            outer = torch.optim.SGD([theta], lr=self.outer_lr, momentum=self.outer_momentum,
                                    nesterov=self.nesterov and self.outer_momentum > 0)
            if self.outer_momentum > 0:
                outer.state[theta]["momentum_buffer"] = state["diloco.momentum"]
            return outer
        kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "yogi": Yogi}
        outer = kinds[self.outer]([theta], lr=self.outer_lr, betas=FEDOPT_BETAS, eps=FEDOPT_EPS)
        outer.state[theta].update({key: state["diloco." + key] for key in ("exp_avg", "exp_avg_sq", "step")
                                   if "diloco." + key in state})
        return outer

    def round_ends(self, step, epoch_end):
        return ends_every(self.every, step, epoch_end)

    def merge_replicas(self, replica, comm):
        theta = replica.strategy_state["diloco.theta"]
        n = replica.num_parameters
        if isinstance(self.compress, compression.NoCompression):
            state = replica.state_vector()
            merged = combined(replica, comm, self.merge, state, merge_weight(replica.samples_since_merge))
            distance = torch.linalg.vector_norm(state[..., :n] - merged[..., :n], dim=-1)
            theta.grad = theta - merged[..., :n]  # the pseudo-gradient θ − merge
        else:  # the mean of the replicas' compressed pseudo-gradients θ − θᵢ
            merged, theta.grad, distance = merge_change(replica, comm, self.compress, theta)
        self.outer_optimizer(theta, replica.strategy_state).step()
        theta.grad = None
        merged[..., :n] = theta
        replica.load_state_vector(merged)
        replica.project()  # projected outer SGD: θ itself stays inside the constraint set
        theta.copy_(replica.state_vector()[..., :n])
        return distance
