"""fedbuff: asynchronous local SGD with a buffered, staleness-weighted server (FedBuff)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import merges
from ..errors import ConfigError, expected
from .base import POINT_TO_POINT, Strategy, check_every, ends_every

SERVER = 0  # the server's rank; workers are ranks 1..N, worker index = rank - 1


@dataclass(frozen=True)
class FedBuff(Strategy):
    """Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation"
    (AISTATS; arXiv 2106.06639), Algorithm 1, with rank 0 as the server and N workers.

    Each worker trains ``every`` local steps (or to its epoch's end) of the run's optimizer from
    the last model it received, sends its change Δ = θ_received − θ_local (parameters and
    floating buffers) with the server version it started from, and at once gets the server's
    current model back; no worker waits for another. The server adds s(τ)·Δ to its buffer,
    τ = its version now minus the worker's, s(τ) = (1+τ)^(−staleness) (FedBuff's 1/√(1+τ) at
    the default 0.5, Xie et al. 2019's polynomial rule; 0: no down-weighting). Every ``buffer``
    (K) arrivals it applies Δ̄ = (1/K)·Σ s(τᵢ)Δᵢ (unison.merges.buffered_change) by a step of
    torch.optim.SGD with lr ``server_lr`` (η_g) and ``server_momentum`` on the parameters, with
    Δ̄ as their gradient; floating buffers take θ − Δ̄ directly. The version then counts up.
    A worker's last change may leave the buffer partly filled: it is applied as its own mean.

    The server trains nothing: ``workers=N`` runs N + 1 ranks (under torchrun start N + 1).
    Given the order in which changes arrive, everything is determined: each record's
    ``arrivals`` lists [worker, version it started from, staleness]; ``replay`` (a list of
    worker indices 0..N−1, or a history.jsonl of an earlier run) makes the server take the
    changes in that order, reproducing that run. Workers keep their optimizer state across
    sends (as diloco's inner optimizers do); the paper's clients start each round afresh,
    which is the same for plain SGD.

    Reductions: one worker with buffer=1, server_lr=1 and no momentum is plain training (each
    change is applied whole). With N > 1 it does not reduce to ``periodic`` even at K = N:
    the server answers each arrival at once, so the first K − 1 workers restart from the
    model before the buffered step (in the paper too).
    """

    name = "fedbuff"
    needs = frozenset({POINT_TO_POINT})
    servers = 1
    asynchronous = True
    compared_by_default = False  # opt-in: `unison compare --strategies "fedbuff(...)"`
    every: int | str = "epoch"
    buffer: int = 2
    server_lr: float = 1.0
    server_momentum: float = 0.0
    staleness: float = 0.5
    replay: Any = None

    def __post_init__(self) -> None:
        check_every(self.name, self.every)
        if isinstance(self.buffer, bool) or not isinstance(self.buffer, int) or self.buffer < 1:
            raise ConfigError(expected("fedbuff.buffer", self.buffer, "an integer >= 1 (changes per server step)"))
        lr, momentum, exponent = self.server_lr, self.server_momentum, self.staleness
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
            raise ConfigError(expected("fedbuff.server_lr", lr, "a finite number > 0"))
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ConfigError(expected("fedbuff.server_momentum", momentum, "a number in [0, 1)"))
        if isinstance(exponent, bool) or not isinstance(exponent, (int, float)) or not (
                exponent >= 0 and math.isfinite(exponent)):
            raise ConfigError(expected("fedbuff.staleness", exponent, "a finite number >= 0 (the a in (1+τ)^-a)"))
        object.__setattr__(self, "replay", parse_replay(self.replay))

    def world_size(self, workers: int) -> int:
        return workers + self.servers

    def check(self, world_size, has_validation, steps):
        if self.replay is not None and any(w >= world_size for w in self.replay):
            raise ConfigError(expected("fedbuff.replay", max(self.replay),
                                       f"worker indices 0..{world_size - 1} (this run has {world_size} workers)"))

    def check_schedule(self, epochs: int, steps: list[int]) -> None:
        """A replayed order must name each worker exactly as often as it sends."""
        if self.replay is None:
            return
        for worker, per_epoch in enumerate(steps):
            sends, named = len(self.sends(per_epoch, epochs)), self.replay.count(worker)
            if sends != named:
                raise ConfigError(f"fedbuff.replay names worker {worker} {named} time(s), but with these "
                                  f"settings it sends {sends} change(s); replay the order of a run with "
                                  "the same workers, data, batch_size, epochs and every")

    def round_ends(self, step, epoch_end):
        """Whether a worker sends its change after its local ``step``."""
        return ends_every(self.every, step, epoch_end)

    def sends(self, steps_per_epoch: int, epochs: int) -> list[int]:
        """The local steps after which a worker with ``steps_per_epoch`` batches sends its
        change; the last is its last step (a worker without data sends one empty change)."""
        total = steps_per_epoch * epochs
        points = [step for step in range(1, total + 1)
                  if self.round_ends(step, False) or (step % steps_per_epoch == 0 and self.round_ends(step, True))]
        if not points or points[-1] != total:
            points.append(total)
        return points

    def merge_replicas(self, replica, comm):
        raise RuntimeError("fedbuff has no synchronous merge; unison.engine.asynchronous runs it")

    # ---- the server's math (its loop is unison.engine.asynchronous.serve) ----

    def server_optimizer(self, theta: torch.Tensor) -> torch.optim.Optimizer:
        """η_g's step on the parameters θ, Δ̄ as their gradient (momentum state kept in it)."""
        return torch.optim.SGD([theta], lr=self.server_lr, momentum=self.server_momentum)

    def buffered(self, changes: list[torch.Tensor], staleness: list[int], full: bool) -> torch.Tensor:
        """Δ̄ of a full buffer (divided by K) or of the last, partly filled one (its mean)."""
        return merges.buffered_change(changes, staleness, self.staleness, self.buffer if full else None)


def parse_replay(replay: Any) -> tuple[int, ...] | None:
    """Worker indices from a list, a string "[0, 1, 0]" / "0 1 0", or a history.jsonl path."""
    if replay is None:
        return None
    if isinstance(replay, str):
        text = replay.strip()
        if text and Path(text).is_file():
            return _from_history(Path(text))
        replay = text.strip("[]()").replace(",", " ").split()
    if isinstance(replay, int) and not isinstance(replay, bool):
        replay = [replay]
    try:
        order = tuple(int(w) for w in replay)
    except (TypeError, ValueError):
        order = None
    if not order or any(w < 0 for w in order) or any(isinstance(w, bool) for w in replay):
        raise ConfigError(expected("fedbuff.replay", replay, "a list of worker indices >= 0, or the path of "
                                   "an earlier fedbuff run's history.jsonl"))
    return order


def _from_history(path: Path) -> tuple[int, ...]:
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        order = tuple(int(arrival[0]) for record in records for arrival in record["arrivals"])
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ConfigError(f"fedbuff.replay={str(path)!r} is not the history.jsonl of a fedbuff run "
                          f"(records with 'arrivals'): {exc}") from None
    if not order:
        raise ConfigError(f"fedbuff.replay={str(path)!r} records no arrivals")
    return order
