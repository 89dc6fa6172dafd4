"""Parallel training strategies, usable by name (``"periodic(every=16)"``) or as objects."""

from __future__ import annotations

from typing import Any

from .. import specs
from .base import Strategy
from .diloco import DiLoCo
from .fedbuff import FedBuff
from .fednova import FedNova
from .fedprox import FedProx
from .hogwild import Hogwild
from .oneshot import Oneshot
from .periodic import Periodic
from .scaffold import Scaffold
from .single import Single
from .sync import Sync

REGISTRY: dict[str, type[Strategy]] = {cls.name: cls for cls in (Single, Sync, Periodic, Oneshot, Hogwild, DiLoCo,
                                                     FedProx, Scaffold, FedNova, FedBuff)}
NAMES = tuple(REGISTRY)


def parse(spec: Any) -> Strategy:
    """A Strategy from a spec such as ``"sync"``, ``"periodic(every=16, warmup=100)"`` or
    ``"periodic(16, merge=trimmed_mean(0.2))"``; a Strategy object passes through."""
    return specs.parse(spec, REGISTRY, "strategy", Strategy)


__all__ = ["Strategy", "Single", "Sync", "Periodic", "Oneshot", "Hogwild", "DiLoCo", "FedProx", "Scaffold", "FedNova", "FedBuff", "parse", "NAMES",
           "REGISTRY"]
