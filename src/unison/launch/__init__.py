"""Backends: how workers run and talk. A backend is one file here plus one entry in REGISTRY.

Each file defines a ``Backend`` (unison.launch.base) and an instance of it, ``BACKEND``; the
plan, the configs, compare and the CLI read backends only from this registry.
"""

from __future__ import annotations

from ..errors import ConfigError, expected
from . import processes, stacked, threads, torchrun
from .base import Backend, cpu_cores, pinned_threads, threads_per_worker

REGISTRY: dict[str, Backend] = {b.name: b for b in (threads.BACKEND, processes.BACKEND, torchrun.BACKEND,
                                                    stacked.BACKEND)}
NAMES = tuple(REGISTRY)


def get(name: str) -> Backend:
    """The backend called ``name``; ConfigError naming the accepted ones otherwise."""
    if name not in REGISTRY:
        raise ConfigError(expected("backend", name, NAMES))
    return REGISTRY[name]


__all__ = ["Backend", "REGISTRY", "NAMES", "get", "cpu_cores", "pinned_threads", "threads_per_worker"]
