"""Per-round records: kept in memory and, when a path is given, appended as JSON lines.

A record has at least: epoch (completed, fractional), step, wall_s (since fit() was called,
start-up included), samples (seen by all workers so far), train_loss, divergence (mean distance
of the replicas to their merge, before it), comm_bytes (sent per worker so far), and with
validation data val_loss and, for classification, val_acc.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable


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
