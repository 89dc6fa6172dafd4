"""Merge math: pure functions from a list of replica states (flat tensors) to one state.

No communication happens here. Strategies all-reduce (for ``mean``) or gather (for the rest),
then call these. ``Communicator.all_reduce_mean`` computes ``weighted_mean`` in one collective;
tests hold the two to each other. The rule objects at the end (``Mean``, ``Median``, ...) are
what a strategy's ``merge=`` option holds: a name, options, and one verb, ``combine``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch

from . import specs
from .errors import ConfigError, expected


def _check(states: Sequence[torch.Tensor]) -> torch.Tensor:
    if not states:
        raise ValueError("merge needs at least one replica state")
    shape = states[0].shape
    if any(s.shape != shape for s in states):
        raise ValueError("replica states differ in shape: " + ", ".join(str(tuple(s.shape)) for s in states))
    return torch.stack(list(states))


def mean(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """Coordinate-wise arithmetic mean (McMahan et al. 2017 with equal weights)."""
    return _check(states).mean(dim=0)


def weighted_mean(states: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i·θ_i / sum_i w_i: FedAvg's merge, w_i = samples replica i trained on
    (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data"). Weights must be >= 0 with a positive sum."""
    stacked = _check(states)
    if len(weights) != len(states):
        raise ValueError(f"{len(weights)} weights for {len(states)} replica states")
    w = torch.as_tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    if (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    return (stacked * w.reshape(-1, *([1] * (stacked.dim() - 1)))).sum(dim=0) / w.sum()


def median(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """Coordinate-wise median; with an even count, the mean of the two middle values
    (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates")."""
    ordered = _check(states).sort(dim=0).values
    n = len(ordered)
    low, high = ordered[(n - 1) // 2], ordered[n // 2]
    if n % 2:
        return high.clone()  # the middle value itself: (x + x) / 2 overflows for |x| > max / 2
    total = low + high
    # two middle values beyond half the largest float overflow their sum: halve them first
    # there only, so ordinary values keep the exactly rounded (low + high) / 2
    overflowed = total.isinf() & low.isfinite() & high.isfinite()
    return torch.where(overflowed, low / 2 + high / 2, total / 2)


def trimmed_count(n: int, beta: float) -> int:
    """How many values trimmed_mean drops at each end: floor(beta·n), always leaving one."""
    return min(math.floor(beta * n + 1e-9), (n - 1) // 2)


def trimmed_mean(states: Sequence[torch.Tensor], beta: float) -> torch.Tensor:
    """Coordinate-wise mean after dropping the floor(beta·n) largest and smallest values,
    0 <= beta < 0.5 (Yin et al. 2018)."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"beta={beta} must be in [0, 0.5)")
    ordered = _check(states).sort(dim=0).values
    k = trimmed_count(len(ordered), beta)
    return ordered[k:len(ordered) - k].mean(dim=0)


def krum_scores(states: Sequence[torch.Tensor], f: int) -> torch.Tensor:
    """Krum's score of each state: the sum of squared distances to its n − f − 2 nearest
    other states (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent"). Needs n >= 2f + 3."""
    stacked = _check(states).double()
    n = len(stacked)
    if f < 0 or n < 2 * f + 3:
        raise ValueError(f"krum with f={f} needs at least 2f+3={2 * f + 3} states, got {n}")
    distances = _squared_distances(stacked.reshape(n, -1))
    distances.fill_diagonal_(math.inf)  # a state is not its own neighbour
    return distances.sort(dim=1).values[:, :n - f - 2].sum(dim=1)


def _squared_distances(flat: torch.Tensor) -> torch.Tensor:
    """The n × n squared distances of the rows of ``flat`` as sums of squared differences.

    Not torch.cdist: above 25 rows it uses |a|² + |b|² − 2a·b, which cancels for near-equal
    states (replicas just after a merge) and then picks the wrong Krum winner. One row at a
    time keeps the extra memory at one copy of ``flat`` and the matrix exactly symmetric.
    """
    n = len(flat)
    distances = torch.zeros(n, n, dtype=flat.dtype, device=flat.device)
    for i in range(1, n):
        distances[i, :i] = distances[:i, i] = (flat[:i] - flat[i]).square_().sum(dim=1)
    return distances


def multi_krum(states: Sequence[torch.Tensor], f: int, m: int | None = None) -> torch.Tensor:
    """Mean of the m states with the lowest Krum scores (m defaults to n − f); m = 1 is Krum."""
    scores = krum_scores(states, f)
    m = len(states) - f if m is None else m
    if not 1 <= m <= len(states):
        raise ValueError(f"multi_krum m={m} must be between 1 and the {len(states)} states")
    # stable: equal scores keep replica order, so every rank picks the same states
    chosen = torch.sort(scores, stable=True).indices[:m]
    return _check(states)[chosen].mean(dim=0)


def krum(states: Sequence[torch.Tensor], f: int) -> torch.Tensor:
    """The single state with the lowest Krum score (Blanchard et al. 2017)."""
    return multi_krum(states, f, m=1)


def greedy_soup(states: Sequence[torch.Tensor], score: Callable[[torch.Tensor], float]
                ) -> tuple[torch.Tensor, list[int]]:
    """Wortsman et al. 2022, "Model soups": sort the states by ``score`` (validation accuracy,
    higher is better), start the soup with the best, and add each next state only if the
    uniform mean's score does not drop. Returns the soup and the indices it holds."""
    stacked = _check(states)
    scores = [score(s) for s in stacked]
    order = sorted(range(len(stacked)), key=lambda i: -scores[i])  # ties keep replica order
    chosen, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        candidate = score(stacked[chosen + [i]].mean(dim=0))
        if candidate >= best:
            chosen, best = chosen + [i], candidate
    return stacked[chosen].mean(dim=0), chosen


def divergence(states: Sequence[torch.Tensor], merged: torch.Tensor) -> float:
    """Mean Euclidean distance of the replica states to the merged state."""
    stacked = _check(states)
    return float(torch.linalg.vector_norm((stacked - merged).reshape(len(stacked), -1), dim=1).mean())


def staleness_weight(staleness: int, exponent: float) -> float:
    """s(τ) = (1 + τ)^(−a): the polynomial staleness weight of a change computed from a model
    τ server versions old (Xie et al. 2019, "Asynchronous Federated Optimization"; FedBuff,
    Nguyen et al. 2022, uses a = 1/2, s(τ) = 1/√(1+τ)); a = 0 weighs every change alike."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return (1.0 + staleness) ** -exponent


def buffered_change(changes: Sequence[torch.Tensor], staleness: Sequence[int], exponent: float,
                    size: int | None = None) -> torch.Tensor:
    """FedBuff's buffered update Δ̄ = (1/K)·Σᵢ s(τᵢ)·Δᵢ over the buffer's changes Δᵢ (each a
    worker's start model minus its model after its local steps; Nguyen et al. 2022,
    "Federated Learning with Buffered Asynchronous Aggregation", Algorithm 1). ``size`` is K,
    by default the number of changes (a last, partly filled buffer is its own mean). Summed
    in buffer order, so the result depends on the arrival order only."""
    stacked = _check(changes)
    if len(staleness) != len(stacked):
        raise ValueError(f"{len(staleness)} staleness values for {len(stacked)} changes")
    total = torch.zeros_like(stacked[0])
    for change, tau in zip(stacked, staleness):
        total += staleness_weight(int(tau), exponent) * change
    return total / (len(stacked) if size is None else size)


# ---- rule objects: what ``merge=`` holds ----

class Merge(specs.Spec, ABC):
    """How a strategy combines replica states (or gradients). Subclasses are frozen dataclasses."""

    needs_validation: ClassVar[bool] = False   # greedy_soup scores candidates on held-out data

    @abstractmethod
    def combine(self, states: Sequence[torch.Tensor], weights: Sequence[float],
                score: Callable[[torch.Tensor], float] | None = None) -> torch.Tensor:
        """One state from the replicas' states; ``weights`` are their samples since the last merge."""

    def check(self, world_size: int) -> None:
        """Raise ConfigError if this rule cannot work with ``world_size`` replicas."""


@dataclass(frozen=True)
class Mean(Merge):
    """Samples-weighted mean; strategies compute it with one all-reduce instead of a gather."""

    name = "mean"

    def combine(self, states, weights, score=None):
        return weighted_mean(states, weights)


@dataclass(frozen=True)
class Median(Merge):
    """Coordinate-wise median; replicas count equally, whatever their samples."""

    name = "median"

    def combine(self, states, weights, score=None):
        return median(states)


@dataclass(frozen=True)
class TrimmedMean(Merge):
    """Coordinate-wise mean without the floor(beta·n) largest and smallest values."""

    name = "trimmed_mean"
    beta: float = 0.2

    def __post_init__(self):
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0 <= self.beta < 0.5:
            raise ConfigError(expected("trimmed_mean.beta", self.beta, "a number in [0, 0.5)"))

    def check(self, world_size):
        if self.beta > 0 and trimmed_count(world_size, self.beta) == 0:
            fix = f"use beta >= {1 / world_size:.3g} or more workers" if world_size >= 3 else \
                "trimming needs at least 3 workers"
            raise ConfigError(f"trimmed_mean(beta={self.beta}) trims nothing with {world_size} workers "
                              f"(floor(beta·workers) = 0); {fix}")

    def combine(self, states, weights, score=None):
        return trimmed_mean(states, self.beta)


@dataclass(frozen=True)
class Krum(Merge):
    """The one replica closest to its n − f − 2 nearest neighbours, tolerating f Byzantine ones."""

    name = "krum"
    f: int = 1

    def __post_init__(self):
        if isinstance(self.f, bool) or not isinstance(self.f, int) or self.f < 0:
            raise ConfigError(expected(f"{self.name}.f", self.f, "an integer >= 0"))

    def check(self, world_size):
        if world_size < 2 * self.f + 3:
            raise ConfigError(f"{self.name}(f={self.f}) needs workers >= 2f+3 = {2 * self.f + 3}, "
                              f"got workers={world_size}; lower f or add workers")

    def combine(self, states, weights, score=None):
        return krum(states, self.f)


@dataclass(frozen=True)
class MultiKrum(Krum):
    """Mean of the m replicas with the lowest Krum scores (m defaults to workers − f)."""

    name = "multi_krum"
    m: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.m is not None and (isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1):
            raise ConfigError(expected("multi_krum.m", self.m, "an integer >= 1 or none"))

    def check(self, world_size):
        super().check(world_size)
        if self.m is not None and self.m > world_size:
            raise ConfigError(expected("multi_krum.m", self.m, f"at most workers={world_size}"))

    def combine(self, states, weights, score=None):
        return multi_krum(states, self.f, self.m)


@dataclass(frozen=True)
class GreedySoup(Merge):
    """Greedy model soup over the replicas, scored on the validation data (needs ``val``)."""

    name = "greedy_soup"
    needs_validation = True

    def combine(self, states, weights, score=None):
        if score is None:
            raise ValueError("greedy_soup needs a score function (validation data)")
        return greedy_soup(states, score)[0]


REGISTRY: dict[str, type[Merge]] = {cls.name: cls for cls in (Mean, Median, TrimmedMean, Krum, MultiKrum, GreedySoup)}
NAMES = tuple(REGISTRY)


def parse(spec: Any) -> Merge:
    """A Merge from ``"median"``, ``"trimmed_mean(0.1)"``, ``"krum(f=1)"``, ... or the object."""
    return specs.parse(spec, REGISTRY, "merge", Merge)
