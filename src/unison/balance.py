"""Shares sized by worker speed (``balance="speed"``): pure math, the same on every rank.

Chen et al. 2020, "Semi-Dynamic Load Balancing: Efficient Distributed Learning in Non-Dedicated
Environments" (LB-BSP): give each worker a part of the data and of the global batch in proportion
to its measured throughput, so that a synchronous step or round waits on no one. Here, in epoch
e with rates v_r:

- the epoch's T = N·(n // N) samples (the ``shard`` partition's) are split into shares s_r ∝ v_r
  (largest remainder, at least 1 each);
- worker r's batch is b_r = ⌈s_r·b / (n // N)⌉, so that every worker needs at most the
  ``shard`` partition's steps per epoch, ⌈(n // N) / b⌉, and equal rates give b_r = b;
- the epoch's permutation (``shard``'s: seed + epoch) is dealt out so that worker r takes its
  k-th sample at "time" (k+1)/s_r, ties to the lower rank. With equal rates that is every N-th
  sample from position r: exactly ``shard``, i.e. DistributedSampler.

Merges keep weighting replicas by the samples they trained on; sync's gradients by batch size.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def apportion(total: int, weights: Sequence[float], minimum: int = 1) -> list[int]:
    """``total`` split ∝ ``weights`` by largest remainder (ties to the lower index), then each
    raised to ``minimum`` by taking from the largest; the parts add up to ``total``."""
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    parts = [int(e) for e in exact]
    for r in sorted(range(len(parts)), key=lambda r: (parts[r] - exact[r], r))[:total - sum(parts)]:
        parts[r] += 1
    for r in range(len(parts)):
        while parts[r] < minimum:
            parts[max(range(len(parts)), key=lambda i: (parts[i], -i))] -= 1
            parts[r] += 1
    return parts


def usable_rates(rates: Sequence[float]) -> list[float]:
    """Measured rates with an unmeasured (0, negative or not finite) one set to the mean of the
    others; all equal when none was measured."""
    good = [r for r in rates if math.isfinite(r) and r > 0]
    if not good:
        return [1.0] * len(rates)
    mean = sum(good) / len(good)
    return [r if math.isfinite(r) and r > 0 else mean for r in rates]


def balanced_sizes(n: int, world_size: int, batch_size: int, rates: Sequence[float]) -> tuple[list[int], list[int]]:
    """(shares, batch sizes) of one epoch for workers with these relative ``rates``."""
    per_worker = n // world_size
    shares = apportion(per_worker * world_size, usable_rates(rates))
    batches = [max(1, math.ceil(share * batch_size / per_worker)) for share in shares]
    return shares, batches


def balanced_indices(n: int, world_size: int, rank: int, epoch: int, seed: int,
                     shares: Sequence[int]) -> torch.Tensor:
    """Worker ``rank``'s indices in ``epoch``: the epoch's permutation dealt out by ``shares``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    times = torch.cat([(torch.arange(s, dtype=torch.float64) + 1) / s for s in shares])
    owners = torch.cat([torch.full((s,), r) for r, s in enumerate(shares)])
    dealt = owners[torch.sort(times, stable=True).indices]  # stable: ties to the lower rank
    return order[:len(dealt)][dealt == rank]
