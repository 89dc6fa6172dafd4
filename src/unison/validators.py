"""The one set of value checks: every setting is checked by these, and each failure is a
ConfigError naming the field and what it accepts. Imports nothing of unison but errors, so any
module (models, configs, strategies) may use it."""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError, expected


def check_int(field_name: str, value: Any, *, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
            maximum is not None and value > maximum):
        bound = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
        raise ConfigError(expected(field_name, value, bound))


def check_float(field_name: str, value: Any, *, low: float, high: float = math.inf,
                low_open: bool = False, high_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        left, right = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(expected(field_name, value, f"a finite number in {left}{low}, {high}{right}"))


def check_choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(expected(field_name, value, choices))


def check_bool(field_name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(expected(field_name, value, "true or false"))
