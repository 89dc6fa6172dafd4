"""Start the workers of a run and bring back rank 0's outcome. One module per backend."""

from __future__ import annotations

import os

# What each backend offers; a strategy's ``needs`` must be a subset (checked in fit()).
CAPABILITIES = {
    "threads": frozenset({"shared_memory"}),
    "processes": frozenset({"shared_memory"}),
    "torchrun": frozenset(),
    "stacked": frozenset(),
}
# Why a backend lacks a capability, by (capability, backend).
CAPABILITY_REASONS = {
    ("shared_memory", "torchrun"): "it needs one model held in one machine's shared memory, and "
                                   "torchrun's workers may run on different machines",
    ("shared_memory", "stacked"): "its workers must all update one shared model, and stacked replicas "
                                  "are separate copies trained as one batched computation",
}


def cpu_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    """Intra-op threads per worker so that workers × threads ≤ cores (no oversubscription)."""
    return max(1, cpu_cores() // workers)
