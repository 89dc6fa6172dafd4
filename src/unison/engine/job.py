"""What crosses the process boundary: the Job a worker runs and the Outcome it sends back.

The driver's plan builds one Job per run; every setting a worker needs travels in it as the
value it is used as (a strategy object, a bound partition, a loss callable, a parsed checkpoint
schedule), so no worker re-reads or re-derives a setting. Picklable: backend "processes"
sends it to every worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..data import TrainData
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint
    from ..partitions import Partition
    from ..penalties import Constraint, Penalty
    from ..schedules import Schedule
    from ..strategies.base import Strategy

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class OptimizerSettings:
    """A named torch optimizer and its settings, or the user's ``factory(params) -> Optimizer``."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    factory: Callable | None = None

    def build(self, params) -> torch.optim.Optimizer:
        params = list(params)
        if self.factory is not None:
            optimizer = self.factory(params)
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise ConfigError(f"optimizer callable returned {type(optimizer).__name__}; "
                                  "expected a torch.optim.Optimizer")
            return optimizer
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                                   weight_decay=self.weight_decay, nesterov=self.nesterov)
        if self.name in ("adam", "adamw"):
            cls = torch.optim.Adam if self.name == "adam" else torch.optim.AdamW
            return cls(params, lr=self.lr, weight_decay=self.weight_decay)
        raise ConfigError(f"optimizer={self.name!r} needs a callable(params) -> Optimizer passed to fit(); "
                          f"a run file accepts {', '.join(repr(o) for o in OPTIMIZERS)}")


@dataclass(frozen=True)
class CheckpointSettings:
    """Where and when rank 0 writes checkpoints (unison.checkpoint), resolved by the plan."""

    directory: str
    kind: str                  # "rounds" or "seconds"
    every: float               # that many rounds, or seconds
    keep: int
    record: dict[str, Any]     # the run's settings as plain values, saved in state.json


@dataclass
class Job:
    """Everything a worker needs to train its part of a run."""

    strategy: "Strategy"
    partition: "Partition"            # bound to the training labels where it needs them
    workers: int                      # threads or processes of the run
    replicas_per_worker: int          # replicas each worker trains
    stacked: bool                     # as one stacked computation (unison.engine.stacked)
    epochs: int
    batch_size: int
    seed: int
    timeout: float                    # seconds any collective may wait for a peer
    optimizer: OptimizerSettings
    loss_fn: Callable
    data: TrainData
    model: nn.Module                  # the start: rank 0's weights are broadcast to all
    penalty: "Penalty | None" = None
    constraint: "Constraint | None" = None
    schedule: "Schedule | None" = None
    nan: str = "stop"
    device: str = "cpu"               # the stacked backend's device; torchrun picks its own
    checkpoint: CheckpointSettings | None = None
    resume: "Checkpoint | None" = None
    started: float = 0.0              # time.time() when fit() was called
    progress: bool = False
    history_path: str | None = None   # rank 0 appends one JSON line per round
    speeds: tuple[float, ...] | None = None   # declared speeds over the fastest, one per replica (a simulation)
    balance: str = "none"             # "speed": shares sized by throughput each epoch (unison.balance)
    on_failure: str = "stop"          # "continue": a worker whose step raises is dropped (loop.py)
    lost: tuple[int, ...] = ()        # ranks that died or stalled in an earlier launch: they train on nothing
    wall_offset: float | None = None  # a relaunch: the wall seconds its first launch resumed at (else the checkpoint's)

    @property
    def replicas(self) -> int:
        return self.workers * self.replicas_per_worker


@dataclass
class Outcome:
    state: dict[str, torch.Tensor]    # the merged model, on CPU
    history: list[dict[str, Any]]     # complete on rank 0
    startup_s: float                  # fit() called -> first training step (rank 0)
