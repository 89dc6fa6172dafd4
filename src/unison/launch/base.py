"""The Backend interface: one object per way of running workers, in one registry (launch/__init__).

A backend says what it offers (capabilities, with the reason for each it lacks), how it stacks
replicas and on which devices, how many workers it runs, and how to launch a Job; the plan
reads all of it and nothing else decides a backend's rules.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from contextlib import contextmanager
from contextvars import ContextVar
from typing import ClassVar, Iterator, Mapping

from ..engine.job import Job, Outcome
from ..errors import ConfigError


def cpu_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# Intra-op threads pinned for the workers that run in this process (compare measures `single`
# at the count fastest for it, or at --threads); None: each worker gets its share of the cores.
# A context variable, not process state: it does not travel into a worker process.
PINNED_THREADS: ContextVar[int | None] = ContextVar("unison_pinned_threads", default=None)


@contextmanager
def pinned_threads(threads: int | None) -> Iterator[None]:
    """Within the block, a worker launched in this process uses ``threads`` intra-op threads."""
    token = PINNED_THREADS.set(threads)
    try:
        yield
    finally:
        PINNED_THREADS.reset(token)


def threads_per_worker(workers: int) -> int:
    """Intra-op threads per worker so that workers × threads ≤ cores (no oversubscription),
    unless pinned_threads() set a count for this context."""
    pinned = PINNED_THREADS.get()
    return pinned if pinned is not None else max(1, cpu_cores() // workers)


class Backend(ABC):
    """How workers run and talk. Subclass, set the class attributes, implement ``launch``."""

    name: ClassVar[str] = ""
    offers: ClassVar[frozenset[str]] = frozenset()   # capabilities a strategy may need
    lacks: ClassVar[Mapping[str, str]] = {}          # capability -> why this backend lacks it
    stacks_all: ClassVar[bool] = False       # every replica stacked into one worker (workers = replicas)
    stacks_per_worker: ClassVar[bool] = False  # replicas_per_worker > 1 allowed
    devices: ClassVar[tuple[str, ...]] = ("cpu",)     # device types device= may name
    in_process: ClassVar[bool] = True        # launched from fit() itself (torchrun: started outside)
    recovers_lost: ClassVar[bool] = False    # can end every worker and start them anew (on_failure="continue")

    def workers(self, requested: int | None) -> int:
        """How many workers the run gets when the user asked for ``requested`` (None: default)."""
        return 2 if requested is None else requested

    def is_writer(self) -> bool:
        """Whether this process writes the run's files (only one process of a run does)."""
        return True

    def restarted(self) -> bool:
        """Whether this process belongs to a group that its launcher restarted after a failure."""
        return False

    def prestart(self, workers: int) -> None:
        """Start what the workers will need (an interpreter to fork from), in the background."""

    def check(self, job: Job) -> None:
        """Pre-flight probes that need the model and data (e.g. can it be vmapped), before any
        worker starts; raise ConfigError."""

    def why_not(self, needs: frozenset[str]) -> str | None:
        """Why this backend cannot offer ``needs``; None when it can."""
        missing = needs - self.offers
        if not missing:
            return None
        return "; ".join(f"{need}: {self.lacks.get(need, need)}" for need in sorted(missing))

    @abstractmethod
    def launch(self, job: Job) -> Outcome:
        """Run the job's workers to the end; return rank 0's outcome or raise WorkerError."""
