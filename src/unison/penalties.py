"""Regularisers R(θ) and constraints C(θ) of the data-parallel update rule

    θ ← θ − α·((1/b)·Σ∇J(θ; xᵢ, yᵢ) + λ∇R(θ)),   then θ projected back onto C.

A penalty is added to every replica's loss, so its gradient joins the data gradient (and, under
``sync``, is averaged with it: every replica holds the same θ, so the mean is λ∇R(θ) itself).
A constraint is a projection applied after every optimizer step and after every merge. Both act
on the trainable parameters, biases included, as torch's ``weight_decay`` does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import specs
from .errors import ConfigError, expected


def _non_negative(kind: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ConfigError(expected(f"{kind}.{name}", value, "a finite number >= 0"))


def _positive(kind: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ConfigError(expected(f"{kind}.{name}", value, "a finite number > 0"))


class Penalty(specs.Spec, ABC):
    """λ·R(θ): a differentiable term added to the loss."""


    @abstractmethod
    def __call__(self, parameters: Sequence[torch.Tensor]) -> torch.Tensor:
        """The penalty's value for these parameters (a scalar tensor with a gradient)."""


@dataclass(frozen=True)
class L2(Penalty):
    """(λ/2)·Σθ²: gradient λθ, the same as SGD's weight_decay=λ (Krogh & Hertz 1992)."""

    name = "l2"
    strength: float = 1e-4

    def __post_init__(self):
        _non_negative("l2", "strength", self.strength)

    def __call__(self, parameters):
        return self.strength / 2 * sum(p.square().sum() for p in parameters)


@dataclass(frozen=True)
class L1(Penalty):
    """λ·Σ|θ|: pushes weights to exactly zero (Tibshirani 1996, the lasso)."""

    name = "l1"
    strength: float = 1e-5

    def __post_init__(self):
        _non_negative("l1", "strength", self.strength)

    def __call__(self, parameters):
        return self.strength * sum(p.abs().sum() for p in parameters)


@dataclass(frozen=True)
class Elastic(Penalty):
    """λ₁·Σ|θ| + (λ₂/2)·Σθ² (Zou & Hastie 2005, the elastic net)."""

    name = "elastic"
    l1: float = 1e-5
    l2: float = 1e-4

    def __post_init__(self):
        _non_negative("elastic", "l1", self.l1)
        _non_negative("elastic", "l2", self.l2)

    def __call__(self, parameters):
        return sum(self.l1 * p.abs().sum() + self.l2 / 2 * p.square().sum() for p in parameters)


class Constraint(specs.Spec, ABC):
    """A set C the parameters must stay in; ``project`` moves them onto it, in place."""


    @abstractmethod
    def project(self, parameters: Sequence[torch.Tensor]) -> None:
        """Project the parameters onto the constraint set, in place."""


@dataclass(frozen=True)
class MaxNorm(Constraint):
    """Each output unit's incoming weight vector (a row of a weight matrix; every tensor with
    two or more dimensions) is scaled down to L2 norm <= c (Srivastava et al. 2014, "Dropout").
    Biases and other vectors are left alone."""

    name = "max_norm"
    c: float = 3.0

    def __post_init__(self):
        _positive("max_norm", "c", self.c)

    @torch.no_grad()
    def project(self, parameters):
        for p in parameters:
            if p.dim() >= 2:
                norms = torch.linalg.vector_norm(p.reshape(len(p), -1), dim=1)
                scale = (self.c / norms.clamp_min(torch.finfo(p.dtype).tiny)).clamp(max=1.0)
                p.mul_(scale.reshape(-1, *([1] * (p.dim() - 1))))


@dataclass(frozen=True)
class UnitBall(Constraint):
    """All trainable parameters together, as one vector θ, kept in the ball ‖θ‖₂ <= radius."""

    name = "unit_ball"
    radius: float = 1.0

    def __post_init__(self):
        _positive("unit_ball", "radius", self.radius)

    @torch.no_grad()
    def project(self, parameters):
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p) for p in parameters]))
        if norm > self.radius:
            for p in parameters:
                p.mul_(self.radius / norm)


@dataclass(frozen=True)
class NonNegative(Constraint):
    """Every parameter >= 0 (as in non-negative matrix factorisation, Lee & Seung 1999)."""

    name = "non_negative"

    @torch.no_grad()
    def project(self, parameters):
        for p in parameters:
            p.clamp_(min=0)


PENALTIES: dict[str, type[Penalty]] = {cls.name: cls for cls in (L2, L1, Elastic)}
CONSTRAINTS: dict[str, type[Constraint]] = {cls.name: cls for cls in (MaxNorm, UnitBall, NonNegative)}


def parse_penalty(spec: Any) -> Penalty | None:
    """A Penalty from ``"l2(1e-4)"``, ``"elastic(l1=1e-5, l2=1e-4)"``, ... or None."""
    return None if spec is None else specs.parse(spec, PENALTIES, "penalty", Penalty)


def parse_constraint(spec: Any) -> Constraint | None:
    """A Constraint from ``"max_norm(3)"``, ``"unit_ball(radius=10)"``, ``"non_negative"`` or None."""
    return None if spec is None else specs.parse(spec, CONSTRAINTS, "constraint", Constraint)
