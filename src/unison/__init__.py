"""unison: train many replicas of a network at once and merge them into one model.

Imports are lazy (PEP 562): ``import unison`` costs almost nothing over ``import torch``; a
name is imported at its first use. Importing unison also starts the processes backend's
forkserver in the background (unison.startup; UNISON_PRESTART=0 opts out), so that the first
fit() on backend "processes" finds its workers' interpreter ready.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import startup as _startup

__version__ = "0.1.0"

_NAMES = {"fit": "api", "prestart": "api", "Result": "api", "Comparison": "comparison", "compare": "comparison",
          **{name: "errors" for name in ("CheckpointError", "ConfigError", "DataError", "NonFiniteError",
                                          "UnisonError", "WorkerError")}}

__all__ = ["fit", "compare", "prestart", "Result", "Comparison", "strategies", "merges", "partitions", "penalties",
           "schedules", "models", "history",
           "UnisonError", "ConfigError", "DataError", "WorkerError", "NonFiniteError", "CheckpointError"]

if TYPE_CHECKING:  # pragma: no cover - what the lazy names are, for type checkers
    from . import history, merges, models, partitions, penalties, schedules, strategies
    from .api import Result, fit, prestart
    from .comparison import Comparison, compare
    from .errors import CheckpointError, ConfigError, DataError, NonFiniteError, UnisonError, WorkerError


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    else:  # a submodule, as `import unison` once imported them all: unison.checkpoint, unison.engine, ...
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'unison' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


_startup.maybe_prestart()
