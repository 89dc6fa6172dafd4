"""Merge math: pure functions from a list of replica states (flat tensors) to one state.

No communication happens here; strategies gather or all-reduce, then call these. The
all-reduce path of ``Communicator.all_reduce_mean`` computes the same ``weighted_mean`` in one
collective; tests hold the two to each other.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _check(states: Sequence[torch.Tensor]) -> None:
    if not states:
        raise ValueError("merge needs at least one replica state")
    shape = states[0].shape
    if any(s.shape != shape for s in states):
        raise ValueError("replica states differ in shape: " + ", ".join(str(tuple(s.shape)) for s in states))


def mean(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """Coordinate-wise arithmetic mean (McMahan et al. 2017 with equal weights)."""
    _check(states)
    return torch.stack(list(states)).mean(dim=0)


def weighted_mean(states: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i·θ_i / sum_i w_i: FedAvg's merge, w_i = samples replica i trained on
    (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data"). Weights must be >= 0 with a positive sum."""
    _check(states)
    if len(weights) != len(states):
        raise ValueError(f"{len(weights)} weights for {len(states)} replica states")
    w = torch.as_tensor(list(weights), dtype=states[0].dtype, device=states[0].device)
    if (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    stacked = torch.stack(list(states))
    return (stacked * w.reshape(-1, *([1] * (stacked.dim() - 1)))).sum(dim=0) / w.sum()


def divergence(states: Sequence[torch.Tensor], merged: torch.Tensor) -> float:
    """Mean Euclidean distance of the replica states to the merged state."""
    _check(states)
    return float(torch.stack([torch.linalg.vector_norm(s - merged) for s in states]).mean())
