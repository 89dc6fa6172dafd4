"""What an experiment is: a published claim, how unison tests it, and the findings it measures.

An experiment is a module with one ``EXPERIMENT = Experiment(...)``; its ``measure`` trains
through ``Context.compare`` (unison.compare with the experiment's seeds, so each part is a
comparison directory with its own report) and returns Findings: per seed, the metric of each arm
and the signed effect that says whether the published direction held (unison.evidence.judge).
"""

from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .. import report
from ..comparison import compare
from ..summary import Records, best, reaches, values
from . import two_hosts

DEFAULT_SEEDS, QUICK_SEEDS = 5, 3


@dataclass
class Finding:
    """One measured claim: the arms' per-seed metric and the effect that decides it."""

    claim: str                      # the published direction, as tested here
    metric: str                     # what ``arms`` hold, with its unit: "rounds to 85% val acc"
    arms: dict[str, list[float]]    # arm label → the metric per seed (nan: not reached)
    effect: str                     # what ``effects`` are: "FedSGD rounds / FedAvg rounds"
    effects: list[float]            # per seed; above ``threshold`` = the published direction
    threshold: float = 0.0
    percent: bool = False           # show the arms as percentages (accuracies)
    effect_unit: str = ""           # how to show effects: "" as numbers, "pp" points, "%" a fraction as %


@dataclass(frozen=True)
class Experiment:
    """A published finding and how unison checks its direction."""

    name: str
    paper: str                      # authors, year, title
    claim: str                      # the paper's claim, in a sentence or two
    paper_figure: str               # the paper's own figure for it, quoted
    setup: str                      # what unison trains, for people
    caveat: str                     # why small data may differ from the paper
    measure: Callable[["Context"], list[Finding]]
    quick_note: str = ""            # what --quick makes smaller
    timed: bool = False             # its verdicts rest on measured time: a loaded machine can flip them


@dataclass
class Context:
    """What an experiment's ``measure`` gets: its seeds, how big to run, where to write."""

    seeds: list[int]
    quick: bool
    out: Path
    progress: bool = True
    parts: list[str] = field(default_factory=list)   # the comparison directories written, in order
    notes: list[str] = field(default_factory=list)   # what the document should say: a part not run, a run failed

    def compare(self, part: str, strategies: Mapping[str, Any], seeds: Sequence[int] | None = None,
                **settings: Any) -> report.Loaded:
        """unison.compare of ``strategies`` (label → run options) with every seed (or the
        consecutive ``seeds`` given, e.g. one seed whose start was made for it) into
        ``out/part``; each measured once unless ``repeat=`` is given (a verdict that rests on
        time should take the median of repeats: per_seed does)."""
        seeds = list(self.seeds if seeds is None else seeds)
        if not seeds or seeds != list(range(seeds[0], seeds[0] + len(seeds))):
            raise ValueError(f"Context.compare runs consecutive seeds; got {seeds}")
        self._check_part(part)
        if self.progress:
            plural = "s" if len(seeds) > 1 else ""
            print(f"  {self._name}/{part}: {len(strategies)} runs × {len(seeds)} seed{plural}", file=sys.stderr, flush=True)
        settings = {"repeat": 1, "backend": "stacked", "data": "digits", "model": None} | settings
        model, data = settings.pop("model"), settings.pop("data")
        compare(model, data, strategies=dict(strategies), seeds=len(seeds), seed=seeds[0],
                out=self.out / part, overwrite=True, progress=self.progress, **settings)
        self.parts.append(part)
        return report.load(self.out / part)

    def over_real_link(self, part: str, strategies: Mapping[str, str], *, rate: str | None, **settings: Any) -> report.Loaded:
        """Like ``compare``, but each run is two hosts over a real link of ``rate`` (None:
        the unthrottled veth; unison.evidence.two_hosts), each seed measured once; a run that
        failed is a note and no value. Needs root: ask ``two_hosts.available()`` first."""
        self._check_part(part)
        if self.progress:
            plural = "s" if len(self.seeds) > 1 else ""
            print(f"  {self._name}/{part}: {len(strategies)} runs × {len(self.seeds)} seed{plural} on two hosts, link "
                  f"{rate or 'veth (unthrottled)'}", file=sys.stderr, flush=True)
        loaded, failures = two_hosts.compare(self.out / part, strategies, self.seeds, rate=rate,
                                             progress=self.progress, **settings)
        self.parts.append(part)
        self.notes += [f"A run failed and has no value: {failure}" for failure in failures]
        return loaded

    @property
    def _name(self) -> str:
        return self.out.name.split(".partial-")[0].lstrip(".")  # out is the experiment's scratch folder

    def _check_part(self, part: str) -> None:
        if part in self.parts:
            raise ValueError(f"comparison {part!r} is written twice by this experiment")


def per_seed(loaded: report.Loaded, label: str, of: Callable[[Records], float]) -> list[float]:
    """``of`` applied to each seed's records of run ``label``: one value per seed the comparison
    ran (any run's), in seed order, nan for a seed this run lacks (it was skipped or failed); a
    seed measured several times (``repeat``) gives the median of its attempts (median_of)."""
    seeds = sorted({seed for runs in loaded.attempts.values() for seed, _ in runs})
    by_seed: dict[int, list[float]] = {}
    for seed, records in loaded.attempts.get(label, []):
        by_seed.setdefault(seed, []).append(of(records))
    return [median_of(by_seed.get(seed, [])) for seed in seeds]


def final(metric: str = "val_acc") -> Callable[[Records], float]:
    """The metric after the last round."""
    return lambda records: float(values(records, metric)[-1]) if values(records, metric) else math.nan


def best_of(metric: str = "val_acc") -> Callable[[Records], float]:
    """The best value of the metric over the rounds."""
    return lambda records: float(best(records, metric) if best(records, metric) is not None else math.nan)


def first_reaching(target: float, metric: str = "val_acc", at: str = "step") -> Callable[[Records], float]:
    """The record field ``at`` (step, epoch, samples, wall_s) of the first round whose metric
    reached ``target``; nan if none did."""
    def of(records: Records) -> float:
        for record in records:
            if record.get(metric) is not None and reaches(record[metric], target, metric):
                return float(record[at])
        return math.nan
    return of


def _paired(a: Sequence[float], b: Sequence[float]) -> None:
    if len(a) != len(b):
        raise ValueError(f"per-seed values of unequal length ({len(a)} and {len(b)}): seeds would be mispaired")


def ratio(numerators: Sequence[float], denominators: Sequence[float], missed: float = math.nan) -> list[float]:
    """Per-seed numerator / denominator; ``missed`` where either is nan (not reached)."""
    _paired(numerators, denominators)
    return [missed if math.isnan(a) or math.isnan(b) or b == 0 else a / b for a, b in zip(numerators, denominators)]


def differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-seed a − b (nan where either is)."""
    _paired(a, b)
    return [x - y for x, y in zip(a, b)]


def median_of(attempts: Sequence[float]) -> float:
    """The median of one seed's attempts; one that missed (nan) counts as the worst, as in
    unison.verdict.median_spread (nan when the median falls on one, or there are none). Not
    median_spread itself: it also reads inf as a miss, where here inf is a value (a compressor
    that never reached the target is slower than any that did), and one attempt of any kind
    (a run's records, for per_seed(…, lambda r: r)) passes through as it is."""
    if not attempts:
        return math.nan
    if len(attempts) == 1:
        return attempts[0]
    ranked = sorted(attempts, key=lambda v: (math.isnan(v), v))
    middle = ranked[(len(ranked) - 1) // 2: len(ranked) // 2 + 1]
    return math.nan if any(math.isnan(v) for v in middle) else statistics.fmean(middle)


def median(numbers: Sequence[float]) -> float:
    """The median of the values that are not nan (nan if none are)."""
    finite = [n for n in numbers if not math.isnan(n)]
    return statistics.median(finite) if finite else math.nan
