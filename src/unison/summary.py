"""The numbers a comparison is judged by, computed from run histories by pure functions.

Time to target is the wall time (start-up included) of the first round whose validation
metric reaches the target; rounds are the only points where the merged model is measured, so
there is no interpolation between them. The default target is ``fraction`` (0.98) of the
reference run's best accuracy; for regression, a loss of best × (2 − fraction), i.e. within 2%
of the reference's best loss. Speedup = the reference's time to target / the run's.

A run measured several times (repeats, seeds) has one row: its time to target is the median
over its attempts with the spread (verdict.median_spread) beside it, its final metric the mean over seeds with
a 95% Student t interval. The verdict and its statistics are in unison.verdict.

With a ``link`` (unison.linkmodel), each row also has modelled figures: its time to target and
per epoch on that link, from its measured compute and its counted collectives; the table labels
every time "measured" or "modelled (link ...)", and the winner on the link is named from them.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from . import linkmodel
from . import verdict as verdicts
from .verdict import final_text, higher_is_better, metric_text, on_link, verdict

__all__ = ["Row", "Summary", "summarise", "markdown", "csv_text", "verdict", "metric_text", "higher_is_better",
           "on_link"]

Records = Sequence[Mapping[str, Any]]

TARGET_FRACTION = 0.98


@dataclass(frozen=True)
class Row:
    """One run's line in the comparison table."""

    label: str
    workers: int | None
    rounds: int
    final: float | None          # validation metric after the last round
    best: float | None           # best validation metric over the rounds
    time_to_target_s: float | None
    speedup: float | None        # over the reference run, on time to target
    samples_per_s: float
    comm_bytes: int              # sent per worker over the whole run
    startup_s: float
    wall_s: float
    attempts: int = 1            # how many times the run was measured (seeds × repeats)
    seeds: int = 1
    time_min_s: float | None = None   # the spread of time to target over the attempts
    time_max_s: float | None = None   # (None: some attempt did not reach it)
    final_interval: float | None = None  # half-width of the 95% t interval of final over seeds
    diverging: bool = False      # some attempt's validation loss rose well above its best
    implausible: bool = False    # its speedup exceeds what its workers on these cores can give
    epoch_s: float | None = None  # measured training time per epoch (median over attempts)
    link_modelled: bool = False  # whether its records could be modelled on the summary's link
    link_time_to_target_s: float | None = None  # modelled on the summary's link (median, spread)
    link_time_min_s: float | None = None
    link_time_max_s: float | None = None
    link_epoch_s: float | None = None


@dataclass(frozen=True)
class Summary:
    rows: list[Row]
    metric: str                  # "val_acc" (higher is better) or "val_loss" (lower is better)
    target: float | None
    target_note: str             # how the target was chosen, for people
    reference: str | None        # the label speedups are measured against
    cores: int | None = None     # the machine's cores (each run's compute budget)
    load: tuple[float, float] | None = None  # its 1-minute load average before and after
    link: str | None = None      # the modelled link's spec (unison.linkmodel), if any


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def metric_of(histories: Mapping[str, Records]) -> str:
    """val_acc when every run has it (classification), else val_loss."""
    if histories and all(records and "val_acc" in records[-1] for records in histories.values()):
        return "val_acc"
    return "val_loss"


def values(records: Records, metric: str) -> list[float]:
    return [r[metric] for r in records if r.get(metric) is not None]


def best(records: Records, metric: str) -> float | None:
    found = values(records, metric)
    if not found:
        return None
    return max(found) if higher_is_better(metric) else min(found)


def reaches(value: float, target: float, metric: str) -> bool:
    return value >= target if higher_is_better(metric) else value <= target


def default_target(best_value: float, metric: str, fraction: float = TARGET_FRACTION) -> float:
    """``fraction`` of the best accuracy, or for a loss the best loss × (2 − fraction)."""
    return fraction * best_value if higher_is_better(metric) else (2.0 - fraction) * best_value


def time_to_target(records: Records, target: float, metric: str) -> float | None:
    """wall_s of the first record whose metric reaches ``target``; None if none does."""
    for record in records:
        value = record.get(metric)
        if value is not None and reaches(value, target, metric):
            return float(record["wall_s"])
    return None


def speedup(reference_s: float | None, run_s: float | None) -> float | None:
    if reference_s is None or run_s is None or run_s <= 0:
        return None
    return reference_s / run_s


def throughput(records: Records) -> float:
    """Samples per second of training (start-up excluded) over the whole run."""
    if not records:
        return 0.0
    last = records[-1]
    if "samples_per_s" in last:
        return float(last["samples_per_s"])
    seconds = last["wall_s"] - last.get("startup_s", 0.0)
    return last["samples"] / seconds if seconds > 0 else 0.0


Attempts = Mapping[str, Sequence[tuple[int, Records]]]


def summarise(histories: Mapping[str, Records], *, workers: Mapping[str, int] | None = None,
              target: float | None = None, reference: str | None = None,
              fraction: float = TARGET_FRACTION, attempts: Attempts | None = None,
              cores: int | None = None, load: Sequence[float] | None = None,
              link: str | linkmodel.Link | None = None) -> Summary:
    """The comparison table. ``reference``: the label speedups are measured against and whose
    best metric sets the default target (default: "single" if present, else the first run).
    ``attempts``: per label, every measurement as (seed, records) (default: the one history);
    ``cores`` and ``load`` (before, after) let the verdict judge speedups and the machine;
    ``link`` adds each run's modelled times on that link (unison.linkmodel)."""
    link = None if link is None else linkmodel.parse(link)
    attempts = attempts or {label: [(0, records)] for label, records in histories.items()}
    metric = metric_of(histories)
    if reference is None or reference not in histories:
        reference = "single" if "single" in histories else next(iter(histories), None)
    note = "given"
    reference_bests = [b for _, records in attempts.get(reference, ()) if (b := best(records, metric)) is not None]
    if target is None and reference_bests:
        target = default_target(statistics.median(reference_bests), metric, fraction)
        note = f"{fraction:.0%} of {reference}'s best" if higher_is_better(metric) else \
            f"within {1 - fraction:.0%} of {reference}'s best"
    spreads = {label: verdicts.median_spread([None if target is None else time_to_target(records, target, metric)
                                              for _, records in runs]) for label, runs in attempts.items()}
    rows = []
    for label, records in histories.items():
        runs = attempts.get(label) or [(0, records)]
        last = records[-1] if records else {}
        by_seed: dict[int, list[float]] = {}
        for seed, run in runs:
            if run and run[-1].get(metric) is not None:
                by_seed.setdefault(seed, []).append(run[-1][metric])
        final, interval = verdicts.mean_interval([statistics.fmean(v) for v in by_seed.values()]) if by_seed \
            else (None, None)
        bests = [b for _, run in runs if (b := best(run, metric)) is not None]
        median, low, high = spreads[label]
        count = (workers or {}).get(label)
        up = speedup(spreads.get(reference, (None,))[0], median)
        epochs = [e for _, run in runs if (e := linkmodel.epoch_seconds(run)) is not None]
        modelled = _on_link(runs, count or 1, link, target, metric)
        rows.append(Row(label=label, workers=count, rounds=len(records), final=final,
                        best=statistics.fmean(bests) if bests else None, time_to_target_s=median, speedup=up,
                        samples_per_s=_median([throughput(run) for _, run in runs]),
                        comm_bytes=int(last.get("comm_bytes", 0)),
                        startup_s=_median([float(run[-1].get("startup_s", 0.0)) for _, run in runs if run]),
                        wall_s=_median([float(run[-1].get("wall_s", 0.0)) for _, run in runs if run]),
                        attempts=len(runs), seeds=len({seed for seed, _ in runs}), time_min_s=low, time_max_s=high,
                        final_interval=interval, diverging=any(verdicts.diverging(run) for _, run in runs),
                        implausible=label != reference and verdicts.implausible(up, count, cores),
                        epoch_s=statistics.median(epochs) if epochs else None, **modelled))
    return Summary(rows=rows, metric=metric, target=target, target_note=note, reference=reference, cores=cores,
                   load=tuple(load) if load else None, link=None if link is None else link.spec())


def _on_link(runs, world: int, link: linkmodel.Link | None, target: float | None, metric: str) -> dict[str, Any]:
    """A row's modelled fields: time to target (median, spread) and per epoch on ``link``."""
    if link is None:
        return {}
    retimed = [r for _, run in runs if (r := linkmodel.retimed(run, world, link)) is not None]
    if not retimed:
        return {}
    median, low, high = verdicts.median_spread([None if target is None else time_to_target(r, target, metric)
                                                for r in retimed])
    epochs = [e for r in retimed if (e := linkmodel.epoch_seconds(r)) is not None]
    return {"link_modelled": True, "link_time_to_target_s": median, "link_time_min_s": low, "link_time_max_s": high,
            "link_epoch_s": statistics.median(epochs) if epochs else None}


def _seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f}"


def time_text(row: Row) -> str:
    """Time to target; with several attempts, the median and its spread (verdict.median_spread)."""
    text = _seconds(row.time_to_target_s)
    if row.attempts > 1 and row.time_min_s is not None:
        text += f" ({row.time_min_s:.2f}–{_seconds(row.time_max_s)})"
    return text


def modelled_label(link: str) -> str:
    return f"modelled (link {link})"


def headers(summary: Summary) -> list[str]:
    name = "val acc" if higher_is_better(summary.metric) else "val loss"
    goal = "time to target" if summary.target is None else f"time to {metric_text(summary.target, summary.metric)}"
    measured = ", measured" if summary.link else ""
    head = ["strategy", "workers", "rounds", f"final {name}", f"best {name}", f"{goal} (s{measured})",
            f"speedup vs {summary.reference}", "samples/s", "comm MB/worker", "start-up (s)", "wall (s)"]
    if summary.link:
        head += ["epoch (s, measured)", f"{goal} (s, modelled: link {summary.link})",
                 f"epoch (s, modelled: link {summary.link})"]
    return head


def cells(row: Row, metric: str, link: str | None = None) -> list[str]:
    """One row as the table shows it (with ``link``, its measured and modelled epoch times and
    modelled time to target at the end)."""
    speed = "—" if row.speedup is None else f"{row.speedup:.2f}×" + (" (implausible)" if row.implausible else "")
    return [row.label + (" (diverging)" if row.diverging else ""), "—" if row.workers is None else str(row.workers),
            str(row.rounds), final_text(row, metric), metric_text(row.best, metric), time_text(row), speed,
            f"{row.samples_per_s:,.0f}",
            f"{row.comm_bytes / 1e6:.2f}", f"{row.startup_s:.2f}", f"{row.wall_s:.2f}"] + ([] if not link else [
                "—" if row.epoch_s is None else f"{row.epoch_s:.3f}",
                _modelled_time(row) if row.link_modelled else "not modelled",
                "—" if row.link_epoch_s is None else f"{row.link_epoch_s:.3f}"])


def _modelled_time(row: Row) -> str:
    text = _seconds(row.link_time_to_target_s)
    if row.attempts > 1 and row.link_time_min_s is not None:
        text += f" ({row.link_time_min_s:.2f}–{_seconds(row.link_time_max_s)})"
    return text


def markdown(summary: Summary) -> str:
    """The table as GitHub Markdown, with the target and the verdict under it."""
    head = headers(summary)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(cells(row, summary.metric, summary.link)) + " |" for row in summary.rows]
    lines += ["", f"Target: {metric_text(summary.target, summary.metric)} validation "
                  f"{'accuracy' if higher_is_better(summary.metric) else 'loss'} ({summary.target_note}). "
                  "Times are wall-clock seconds from the start of each run, start-up included; "
                  "the merged model is measured at round ends only, so a run with more rounds is "
                  "measured more often."
                  + (f" With several attempts, times are medians (spread: {verdicts.SPREAD_RULE}) and finals "
                     "means ± a 95% Student t interval over seeds." if any(r.attempts > 1 for r in summary.rows) else "")
                  + (f" {link_note(summary.link)}" if summary.link else ""),
              "", verdict(summary)]
    return "\n".join(lines) + "\n"


def link_note(link: str) -> str:
    return (f"Measured: times on this machine as run. {modelled_label(link).capitalize()}: each round's measured "
            "compute (wall time less the time inside collectives; a stacked process's divided among its replicas) "
            f"plus its counted collectives timed on a {link} link (ring all-reduce and all-gather, binomial-tree "
            "broadcast; unison.linkmodel), none faster than that round's collectives took here on average; "
            "fedbuff's server steps at the slower of its workers' pace, each cycle longer by its round trip, "
            "and its own link carrying every message; start-up as measured. Not "
            "modelled (and so never the winner on the link): runs with declared speeds=, whose waiting for a "
            "slow worker would count as communication.")


CSV_COLUMNS = ("strategy", "workers", "rounds", "final", "best", "metric", "target", "time_to_target_s",
               "speedup", "samples_per_s", "comm_bytes", "startup_s", "wall_s", "attempts", "seeds",
               "time_min_s", "time_max_s", "final_interval", "diverging", "implausible", "epoch_s", "link",
               "link_time_to_target_s", "link_time_min_s", "link_time_max_s", "link_epoch_s")


def csv_text(summary: Summary) -> str:
    """The table as CSV with full-precision numbers; an empty cell means "none"."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in summary.rows:
        writer.writerow(["" if v is None else v for v in (
            row.label, row.workers, row.rounds, row.final, row.best, summary.metric, summary.target,
            row.time_to_target_s, row.speedup, row.samples_per_s, row.comm_bytes, row.startup_s, row.wall_s,
            row.attempts, row.seeds, row.time_min_s, row.time_max_s, row.final_interval, row.diverging,
            row.implausible, row.epoch_s, summary.link, row.link_time_to_target_s, row.link_time_min_s,
            row.link_time_max_s, row.link_epoch_s)])
    return out.getvalue()
