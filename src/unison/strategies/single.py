"""single: one worker, the baseline every comparison is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from .sync import Sync


@dataclass(frozen=True)
class Single(Sync):
    """Plain SGD in one worker, whatever ``workers`` says; rounds are epochs."""

    name = "single"

    def world_size(self, workers: int) -> int:
        return 1
