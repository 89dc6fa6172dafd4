"""The verdict on one published finding, as pure functions of its per-seed effects.

Each seed gives an effect, signed so that a value above the finding's threshold is the published
direction. The finding is **reproduced** when that direction holds in at least HOLDS_FRACTION of
the seeds (4 of 5, 3 of 3), **not reproduced** when it fails (the effect at or below the threshold,
ties included) in as many, else **inconclusive**; a seed with no effect (nan: an arm missed or did
not run) counts neither way. This is a check of the sign's consistency, not a significance test
(3 of 3 has a one-sided sign-test p of 0.125; 4 of 5, 0.19). The effect size is the mean of the
finite effects with its 95% Student t interval (unison.verdict.mean_interval). Nothing here
imports the rest of unison but verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..verdict import mean_interval

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
HOLDS_FRACTION = 0.8


@dataclass(frozen=True)
class Verdict:
    verdict: str
    holds: int                   # seeds in which the published direction held
    seeds: int
    mean: float | None           # the effect's mean over the seeds (finite ones)
    interval: float | None       # half-width of its 95% t interval (None from one seed)
    missed: int = 0              # seeds with no effect (nan), counted neither way

    def text(self) -> str:
        """E.g. "reproduced (the direction held in 4 of 5 seeds; 4 needed)"."""
        missed = f", {self.missed} without an effect" if self.missed else ""
        return (f"{self.verdict} (the direction held in {self.holds} of {self.seeds} seeds{missed}; "
                f"{needed(self.seeds)} needed)")


def needed(seeds: int) -> int:
    """Seeds in which a direction must hold for a verdict either way: 4 of 5, 3 of 3."""
    return math.ceil(HOLDS_FRACTION * seeds - 1e-9)


def judge(effects: Sequence[float], threshold: float = 0.0) -> Verdict:
    """The verdict on per-seed ``effects``: the direction holds in a seed when its effect is
    above ``threshold`` (nan: it does not hold, and the mean leaves it out)."""
    if not effects:
        raise ValueError("judge needs at least one seed's effect")
    holds = sum(1 for e in effects if not math.isnan(e) and e > threshold)
    against = sum(1 for e in effects if not math.isnan(e) and e <= threshold)
    finite = [e for e in effects if math.isfinite(e)]
    mean, half = mean_interval(finite) if finite else (None, None)
    if holds >= needed(len(effects)):
        verdict = REPRODUCED
    elif against >= needed(len(effects)):
        verdict = NOT_REPRODUCED
    else:
        verdict = INCONCLUSIVE
    return Verdict(verdict, holds, len(effects), mean, half, missed=len(effects) - holds - against)

