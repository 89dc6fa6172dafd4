"""The numbers a comparison is judged by, computed from run histories by pure functions.

Time to target is the wall time (start-up included) of the first round whose validation
metric reaches the target; rounds are the only points where the merged model is measured, so
there is no interpolation between them. The default target is ``fraction`` (0.98) of the
reference run's best accuracy; for regression, a loss of best × (2 − fraction), i.e. within 2%
of the reference's best loss. Speedup = the reference's time to target / the run's.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

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


@dataclass(frozen=True)
class Summary:
    rows: list[Row]
    metric: str                  # "val_acc" (higher is better) or "val_loss" (lower is better)
    target: float | None
    target_note: str             # how the target was chosen, for people
    reference: str | None        # the label speedups are measured against


def higher_is_better(metric: str) -> bool:
    return metric.endswith("acc")


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


def summarise(histories: Mapping[str, Records], *, workers: Mapping[str, int] | None = None,
              target: float | None = None, reference: str | None = None,
              fraction: float = TARGET_FRACTION) -> Summary:
    """The comparison table. ``reference``: the label speedups are measured against and whose
    best metric sets the default target (default: "single" if present, else the first run)."""
    metric = metric_of(histories)
    if reference is None or reference not in histories:
        reference = "single" if "single" in histories else next(iter(histories), None)
    note = "given"
    if target is None and reference is not None and best(histories[reference], metric) is not None:
        target = default_target(best(histories[reference], metric), metric, fraction)
        note = f"{fraction:.0%} of {reference}'s best" if higher_is_better(metric) else \
            f"within {1 - fraction:.0%} of {reference}'s best"
    times = {label: None if target is None else time_to_target(records, target, metric)
             for label, records in histories.items()}
    rows = []
    for label, records in histories.items():
        last = records[-1] if records else {}
        rows.append(Row(label=label, workers=(workers or {}).get(label), rounds=len(records),
                        final=last.get(metric), best=best(records, metric),
                        time_to_target_s=times[label], speedup=speedup(times.get(reference), times[label]),
                        samples_per_s=throughput(records), comm_bytes=int(last.get("comm_bytes", 0)),
                        startup_s=float(last.get("startup_s", 0.0)), wall_s=float(last.get("wall_s", 0.0))))
    return Summary(rows=rows, metric=metric, target=target, target_note=note, reference=reference)


def metric_text(value: float | None, metric: str) -> str:
    if value is None:
        return "—"
    return f"{value:.2%}" if higher_is_better(metric) else f"{value:.4g}"


def _seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f}"


def headers(summary: Summary) -> list[str]:
    name = "val acc" if higher_is_better(summary.metric) else "val loss"
    goal = "time to target (s)" if summary.target is None else \
        f"time to {metric_text(summary.target, summary.metric)} (s)"
    return ["strategy", "workers", "rounds", f"final {name}", f"best {name}", goal,
            f"speedup vs {summary.reference}", "samples/s", "comm MB/worker", "start-up (s)", "wall (s)"]


def cells(row: Row, metric: str) -> list[str]:
    """One row as the table shows it."""
    return [row.label, "—" if row.workers is None else str(row.workers), str(row.rounds),
            metric_text(row.final, metric),
            metric_text(row.best, metric), _seconds(row.time_to_target_s),
            "—" if row.speedup is None else f"{row.speedup:.2f}×", f"{row.samples_per_s:,.0f}",
            f"{row.comm_bytes / 1e6:.2f}", f"{row.startup_s:.2f}", f"{row.wall_s:.2f}"]


def markdown(summary: Summary) -> str:
    """The table as GitHub Markdown, with the target and the verdict under it."""
    head = headers(summary)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(cells(row, summary.metric)) + " |" for row in summary.rows]
    lines += ["", f"Target: {metric_text(summary.target, summary.metric)} validation "
                  f"{'accuracy' if higher_is_better(summary.metric) else 'loss'} ({summary.target_note}). "
                  "Times are wall-clock seconds from the start of each run, start-up included; "
                  "the merged model is measured at round ends only, so a run with more rounds is "
                  "measured more often.",
              "", verdict(summary)]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ("strategy", "workers", "rounds", "final", "best", "metric", "target", "time_to_target_s",
               "speedup", "samples_per_s", "comm_bytes", "startup_s", "wall_s")


def csv_text(summary: Summary) -> str:
    """The table as CSV with full-precision numbers; an empty cell means "none"."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in summary.rows:
        writer.writerow(["" if v is None else v for v in (
            row.label, row.workers, row.rounds, row.final, row.best, summary.metric, summary.target,
            row.time_to_target_s, row.speedup, row.samples_per_s, row.comm_bytes, row.startup_s, row.wall_s)])
    return out.getvalue()


def verdict(summary: Summary) -> str:
    """Which run reached the target first and by how much; which ended best."""
    metric = summary.metric
    reached = sorted((r for r in summary.rows if r.time_to_target_s is not None),
                     key=lambda r: r.time_to_target_s)
    finals = [r for r in summary.rows if r.final is not None]
    best_final = (max if higher_is_better(metric) else min)(finals, key=lambda r: r.final) if finals else None
    sentences = []
    if not reached:
        sentences.append(f"No strategy reached the target ({metric_text(summary.target, metric)}).")
    else:
        winner = reached[0]
        text = f"**{winner.label}** reached the target first, after {winner.time_to_target_s:.2f} s"
        reference = next((r for r in summary.rows if r.label == summary.reference), None)
        if reference is not None and winner is not reference:
            if reference.time_to_target_s is None:
                text += f"; {reference.label} did not reach it"
            else:
                text += f": {winner.speedup:.2f}× the speed of {reference.label} ({reference.time_to_target_s:.2f} s)"
        if len(reached) > 1 and reached[1] is not reference:
            runner_up = reached[1]
            text += (f", {runner_up.time_to_target_s / winner.time_to_target_s:.2f}× the speed of the "
                     f"runner-up {runner_up.label} ({runner_up.time_to_target_s:.2f} s)")
        sentences.append(text + ".")
    if best_final is not None:
        name = "accuracy" if higher_is_better(metric) else "loss"
        tied = [r.label for r in finals if r.final == best_final.final]
        if len(tied) == len(summary.rows) > 1:
            sentences.append(f"Every run ended at {metric_text(best_final.final, metric)} validation {name}.")
        else:
            sentences.append(f"Best final validation {name}: {', '.join(tied)}, "
                             f"{metric_text(best_final.final, metric)}.")
    missed = [r.label for r in summary.rows if r.time_to_target_s is None]
    if missed and reached:
        sentences.append(f"Not reached by: {', '.join(missed)}.")
    slow_start = [f"{r.label} ({r.startup_s:.2f} s of {r.time_to_target_s:.2f} s)" for r in reached
                  if r.startup_s > 0.5 * r.time_to_target_s > 0]
    if slow_start:
        sentences.append(f"Start-up was over half the time to target for {', '.join(slow_start)}.")
    return " ".join(sentences)
