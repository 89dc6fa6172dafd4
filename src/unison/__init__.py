"""unison: train many replicas of a network at once and merge them into one model."""

from . import history, merges, models, partitions, strategies
from .api import Result, fit
from .errors import CheckpointError, ConfigError, DataError, NonFiniteError, UnisonError, WorkerError

__version__ = "0.1.0"

__all__ = ["fit", "Result", "strategies", "merges", "partitions", "models",
           "UnisonError", "ConfigError", "DataError", "WorkerError", "NonFiniteError", "CheckpointError"]
