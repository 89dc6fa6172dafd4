"""Every error unison raises on purpose. Catch ``UnisonError`` to catch them all."""

from __future__ import annotations

from typing import Iterable


class UnisonError(Exception):
    """Base class: a problem unison found and can explain in one line."""


class ConfigError(UnisonError, ValueError):
    """A run setting is missing, unknown or out of range."""


class DataError(UnisonError, ValueError):
    """The training or validation data cannot be used as given."""


class WorkerError(UnisonError, RuntimeError):
    """A worker failed or died while training; names the rank and the cause.

    ``checkpoint`` is the newest valid checkpoint of the run (set by fit()), to resume from.
    ``lost``: the worker died (a signal, an exit without a report) or stalled (its peers timed
    out waiting for it) rather than raising: what on_failure="continue" recovers from by a relaunch.
    """

    def __init__(self, message: str, *, rank: int | None = None, cause: str | None = None,
                 checkpoint: str | None = None, lost: bool = False):
        super().__init__(message)
        self.rank = rank
        self.cause = cause
        self.checkpoint = checkpoint
        self.lost = lost


class NonFiniteError(WorkerError):
    """A training step had a non-finite loss or gradient and the ``nan=`` policy stopped the run.

    ``step`` is the global step; ``replicas`` the ranks whose loss was not finite (empty when
    only the averaged gradient was).
    """

    def __init__(self, message: str, *, rank: int | None = None, cause: str | None = None,
                 step: int | None = None, replicas: tuple[int, ...] = ()):
        super().__init__(message, rank=rank, cause=cause)
        self.step = step
        self.replicas = tuple(replicas)


class CheckpointError(UnisonError, OSError):
    """A checkpoint or model file is missing, corrupt or of the wrong shape."""


class WorkerDropped(UserWarning):
    """on_failure="continue": a worker's training step raised, or its process died or stalled;
    it was left out of the rest of the run (its share unused, its weight 0) and the others went on."""


def expected(field: str, got: object, accepted: str | Iterable[str]) -> str:
    """One-line message naming the field, the bad value and what is accepted."""
    if not isinstance(accepted, str):
        accepted = ", ".join(repr(a) for a in accepted)
    return f"{field}={got!r} is not accepted; expected {accepted}"
