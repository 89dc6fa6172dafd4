"""Yogi as a torch optimizer: FedYogi's server update (Reddi et al. 2021, Algorithm 2)."""

from __future__ import annotations

import torch


class Yogi(torch.optim.Optimizer):
    """Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2 (FedYogi), written as
    a minimiser of the gradient g (for diloco, g = θ − merge = −Δ):

        m ← β₁m + (1 − β₁)g,   v ← v − (1 − β₂)·g²·sign(v − g²),   θ ← θ − lr·m/(√v + τ)

    No bias correction, as in the paper; v starts at τ² (the paper asks v₋₁ ≥ τ²), m at zero.
    Flower's FedYogi (flwr/server/strategy/fedyogi.py) starts v at zero instead and defaults to
    eta=1e-2, tau=1e-3, beta_1=0.9, beta_2=0.99 (unison's diloco keeps its own outer_lr).
    State per parameter: ``exp_avg`` (m) and ``exp_avg_sq`` (v).
    """

    def __init__(self, params, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-3):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.full_like(p, group["eps"] ** 2)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                g2 = g * g
                v.sub_((1 - beta2) * g2 * torch.sign(v - g2))
                p.sub_(group["lr"] * m / (v.sqrt() + group["eps"]))
        return None
