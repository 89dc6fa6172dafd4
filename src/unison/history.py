"""Per-round records: kept in memory and, when a path is given, appended as JSON lines.

A record has at least: epoch (completed, fractional), step, wall_s (since fit() was called,
start-up included), samples (seen by all workers so far), train_loss, divergence (mean distance
of the replicas to their merge, before it), comm_bytes (sent per worker so far), and with
validation data val_loss and, for classification, val_acc. fit() adds startup_s (fit() called
→ first training step, the same in every record of a run) and samples_per_s (samples over
the training time so far, wall_s − startup_s). For the link model (unison.linkmodel) a record
also has rank 0's collectives of its round: comm_s (seconds inside them), collectives (the
strategy's, kind → [calls, payload bytes]) and, when there were any, bookkeeping (unison's own).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from .errors import ConfigError


class History:
    def __init__(self, path: str | Path | None = None):
        self.records: list[dict[str, Any]] = []
        self.path = Path(path) if path else None

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path is not None:
            with self.path.open("a") as sink:  # a line per round: `tail -f` shows progress
                sink.write(json.dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))


def with_throughput(records: Iterable[dict[str, Any]], startup_s: float) -> list[dict[str, Any]]:
    """The records with ``startup_s`` and ``samples_per_s`` (samples seen so far divided by the
    time spent since start-up ended) added to each."""
    out = []
    for record in records:
        training_s = record["wall_s"] - startup_s
        rate = record["samples"] / training_s if training_s > 0 else 0.0
        out.append(record | {"startup_s": startup_s, "samples_per_s": rate})
    return out


def tensorboard_writer_class():
    """torch's SummaryWriter; ConfigError when the optional ``tensorboard`` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard=True needs the optional tensorboard package: "
                          "pip install 'unison[tensorboard]' (or pip install tensorboard)") from None
    return SummaryWriter


def write_tensorboard(records: Iterable[dict[str, Any]], log_dir: str | Path,
                      started: float | None = None) -> None:
    """Every numeric field of every record as a TensorBoard scalar at the record's step (and,
    given the run's start as time.time(), at its wall-clock time)."""
    writer = tensorboard_writer_class()(log_dir=str(log_dir))
    try:
        for record in records:
            walltime = None if started is None else started + record["wall_s"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(key, value, global_step=record["step"], walltime=walltime)
    finally:
        writer.close()
