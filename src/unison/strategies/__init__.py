"""Parallel training strategies, usable by name (``"periodic(every=16)"``) or as objects."""

from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigError, expected
from .base import Strategy
from .oneshot import Oneshot
from .periodic import Periodic
from .single import Single
from .sync import Sync

REGISTRY: dict[str, type[Strategy]] = {cls.name: cls for cls in (Single, Sync, Periodic, Oneshot)}
NAMES = tuple(REGISTRY)

_SPEC = re.compile(r"\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*")


def _value(text: str) -> Any:
    text = text.strip().strip("'\"")
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse(spec: str | Strategy) -> Strategy:
    """A Strategy from a spec such as ``"sync"`` or ``"periodic(every=16, warmup=100)"``."""
    if isinstance(spec, Strategy):
        return spec
    match = _SPEC.fullmatch(spec) if isinstance(spec, str) else None
    if not match or match.group(1) not in REGISTRY:
        raise ConfigError(expected("strategy", spec, NAMES + ("a unison.strategies.Strategy",)))
    cls, args = REGISTRY[match.group(1)], match.group(2)
    options: dict[str, Any] = {}
    for item in filter(str.strip, (args or "").split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"strategy {spec!r}: option {item.strip()!r} must be key=value")
        options[key.strip()] = _value(value)
    accepted = tuple(f for f in getattr(cls, "__dataclass_fields__", {}))
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise ConfigError(f"strategy {cls.name!r} has no option {unknown[0]!r}; "
                          f"accepted: {', '.join(accepted) or 'none'}")
    return cls(**options)


__all__ = ["Strategy", "Single", "Sync", "Periodic", "Oneshot", "parse", "NAMES", "REGISTRY"]
