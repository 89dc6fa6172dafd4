"""unison: train many replicas of a network at once and merge them into one model."""

from . import history, merges, models, partitions, penalties, schedules, strategies
from .api import Result, fit, prestart
from .comparison import Comparison, compare
from .errors import CheckpointError, ConfigError, DataError, NonFiniteError, UnisonError, WorkerError

__version__ = "0.1.0"

__all__ = ["fit", "compare", "prestart", "Result", "Comparison", "strategies", "merges", "partitions", "penalties",
           "schedules", "models", "history",
           "UnisonError", "ConfigError", "DataError", "WorkerError", "NonFiniteError", "CheckpointError"]
