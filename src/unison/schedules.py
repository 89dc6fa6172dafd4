"""Learning-rate schedules as pure functions of the global step.

Every replica counts the same global steps (a replica whose share is used up still counts),
so every replica computes the same learning rate with nothing to exchange, and a resumed run
needs no scheduler state. The factor multiplies each parameter group's initial lr.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from . import specs
from .errors import ConfigError, expected
from .validators import check_int


def _check_fraction(name: str, value: Any, *, low_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not ((value > 0 if low_open else value >= 0) and value <= 1):
        raise ConfigError(expected(name, value, f"a number in {'(' if low_open else '['}0, 1]"))


class Schedule(specs.Spec, ABC):
    """lr at optimizer step k (counted from 0) = initial lr × factor(k)."""

    warmup: int = 0

    def factor(self, step: int, steps_per_epoch: int, total_steps: int) -> float:
        """Linear warm-up over the first ``warmup`` steps (Goyal et al. 2017), then ``decay``."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        return self.decay(step, steps_per_epoch, total_steps)

    @abstractmethod
    def decay(self, step: int, steps_per_epoch: int, total_steps: int) -> float:
        """The factor after warm-up."""


@dataclass(frozen=True)
class Warmup(Schedule):
    """Linear warm-up over ``steps`` steps, then the initial lr."""

    name = "warmup"
    steps: int = 100

    def __post_init__(self):
        check_int("warmup.steps", self.steps, minimum=1)

    @property
    def warmup(self) -> int:  # type: ignore[override]
        return self.steps

    def decay(self, step, steps_per_epoch, total_steps):
        return 1.0


@dataclass(frozen=True)
class Cosine(Schedule):
    """Half a cosine from 1 down to ``min_factor`` over the run, after an optional linear
    warm-up (Loshchilov & Hutter 2017, "SGDR", without restarts)."""

    name = "cosine"
    warmup: int = 0
    min_factor: float = 0.0

    def __post_init__(self):
        check_int("cosine.warmup", self.warmup, minimum=0)
        _check_fraction("cosine.min_factor", self.min_factor, low_open=False)

    def decay(self, step, steps_per_epoch, total_steps):
        progress = min(1.0, (step - self.warmup) / max(1, total_steps - self.warmup))
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Step(Schedule):
    """Multiply the lr by ``gamma`` every ``every`` epochs (torch's StepLR, counted in epochs)."""

    name = "step"
    every: int = 10
    gamma: float = 0.1
    warmup: int = 0

    def __post_init__(self):
        check_int("step.every", self.every, minimum=1)
        _check_fraction("step.gamma", self.gamma, low_open=True)
        check_int("step.warmup", self.warmup, minimum=0)

    def decay(self, step, steps_per_epoch, total_steps):
        return self.gamma ** (step // (self.every * steps_per_epoch))


REGISTRY: dict[str, type[Schedule]] = {cls.name: cls for cls in (Cosine, Step, Warmup)}
NAMES = tuple(REGISTRY)


def parse(spec: Any) -> Schedule | None:
    """A Schedule from ``"cosine"``, ``"cosine(warmup=100)"``, ``"step(every=10, gamma=0.5)"``,
    ``"warmup(200)"``, or None for a constant lr."""
    return None if spec is None else specs.parse(spec, REGISTRY, "schedule", Schedule)
