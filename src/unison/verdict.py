"""The verdict of a comparison and the statistics behind it, as pure functions.

A winner is named only when its lead holds across repeats: the spread of its time to target
(min–max; with TRIM_FROM or more attempts, without the fastest and the slowest, so that one
outlier on a shared machine decides nothing) lies wholly below the runner-up's. A speedup above what N workers on C cores can give
(min(N, C) × 1.25) is called implausible, with its likely cause. A run whose validation loss
rose well above its best after its best round is diverging; it cannot win. A machine whose
load average exceeded its cores while the comparison ran is named as noisy.

Nothing here imports the rest of unison: summary.py builds the table and calls verdict().
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Mapping, Sequence

# Student t, two-sided 95% (the 0.975 quantile), for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
SPEEDUP_SLACK = 1.25          # a speedup above min(workers, cores) × this is implausible
DIVERGE_FACTOR, DIVERGE_MARGIN = 2.0, 0.1
TRIM_FROM = 5                 # with this many attempts or more, the spread leaves out the extremes
SPREAD_RULE = f"min–max, without the fastest and the slowest attempt from {TRIM_FROM} attempts on"


def higher_is_better(metric: str) -> bool:
    return metric.endswith("acc")


def metric_text(value: float | None, metric: str) -> str:
    if value is None:
        return "—"
    return f"{value:.2%}" if higher_is_better(metric) else f"{value:.4g}"


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom: the table to 30, then
    the Cornish-Fisher expansion around the normal quantile (error < 0.001 beyond 30)."""
    if df < 1:
        raise ValueError("t_quantile needs at least one degree of freedom")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_interval(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and the half-width of its 95% Student t interval (None from one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def median_spread(values: Sequence[float | None]) -> tuple[float | None, float | None, float | None]:
    """Median and spread (low, high) of times to target: min and max, or with TRIM_FROM or more
    attempts the second fastest and second slowest. An attempt that missed the target (None)
    counts as slower than any that reached it (None where it falls inside the spread)."""
    reached = sorted(v for v in values if v is not None)
    if not reached:
        return None, None, None
    ordered = reached + [math.inf] * (len(values) - len(reached))
    trim = 1 if len(ordered) >= TRIM_FROM else 0
    middle, low, high = statistics.median(ordered), ordered[trim], ordered[len(ordered) - 1 - trim]
    return tuple(None if math.isinf(v) else v for v in (middle, low, high))


def diverging(records: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the validation loss rose well above its best after the best round (above twice
    the best and the best + 0.1), or became non-finite."""
    losses = [r.get("val_loss") for r in records if r.get("val_loss") is not None]
    if any(not math.isfinite(loss) for loss in losses):
        return True
    if not losses:
        return False
    best_at = min(range(len(losses)), key=losses.__getitem__)
    best = losses[best_at]
    return any(loss > DIVERGE_FACTOR * best and loss > best + DIVERGE_MARGIN for loss in losses[best_at + 1:])


def speedup_limit(workers: int | None, cores: int | None) -> float | None:
    """The largest believable speedup of ``workers`` workers on ``cores`` cores."""
    if not workers or not cores:
        return None
    return min(workers, cores) * SPEEDUP_SLACK


def implausible(speedup: float | None, workers: int | None, cores: int | None) -> bool:
    limit = speedup_limit(workers, cores)
    return speedup is not None and limit is not None and speedup > limit


def noisy(load: Sequence[float | None] | None, cores: int | None) -> bool:
    """Whether the load average (before, after) exceeded the cores; None where it is unknown."""
    known = [value for value in (load or ()) if value is not None]
    return bool(known) and bool(cores) and max(known) > cores


def clear_lead(first: Any, second: Any) -> bool:
    """Whether ``first``'s time-to-target spread lies wholly below ``second``'s (an attempt of
    ``first`` that missed the target is slower than any of ``second``'s)."""
    slowest = first.time_max_s if first.time_max_s is not None else \
        first.time_to_target_s if first.attempts < 2 else math.inf
    fastest = second.time_min_s if second.time_min_s is not None else second.time_to_target_s
    return slowest is not None and fastest is not None and slowest < fastest


def _reached(rows: Sequence[Any]) -> list[Any]:
    """The runs that reached the target without diverging, fastest (median) first."""
    return sorted((r for r in rows if r.time_to_target_s is not None and not r.diverging),
                  key=lambda r: r.time_to_target_s)


def lead(rows: Sequence[Any]) -> tuple[Any | None, list[Any]]:
    """The winner (None when no run's lead holds across repeats) and the leaders: the fastest
    run and every run whose spread overlaps with its."""
    reached = _reached(rows)
    if not reached:
        return None, []
    leaders = [reached[0]] + [r for r in reached[1:] if not clear_lead(reached[0], r)]
    return (reached[0] if len(leaders) == 1 else None), leaders


def on_link(rows: Sequence[Any]) -> list[Any]:
    """The rows with their modelled times on the link in place of the measured ones, for the
    winner on the link; speedups are left out."""
    return [dataclasses.replace(row, time_to_target_s=row.link_time_to_target_s, time_min_s=row.link_time_min_s,
                                time_max_s=row.link_time_max_s, speedup=None, implausible=False) for row in rows]


def link_verdict(summary: Any) -> str:
    """Who would reach the target first on the summary's link, from modelled times."""
    rows = on_link(summary.rows)
    winner, leaders = lead(rows)
    where = f"On a {summary.link} link (modelled from measured compute and counted collectives)"
    if not leaders:
        return f"{where}, no strategy would reach the target."
    if winner is None:
        return f"{where}, no clear winner: " + ", ".join(f"**{r.label}** {_time(r)}" for r in leaders) + \
            " overlap across repeats."
    return f"{where}, **{winner.label}** would reach the target first, after {_time(winner)}; " \
        "the winner on the link is named from these modelled times."


def _time(row: Any) -> str:
    text = f"{row.time_to_target_s:.2f} s"
    if row.attempts > 1 and row.time_min_s is not None:
        high = "not reached" if row.time_max_s is None else f"{row.time_max_s:.2f} s"
        text += f" (median of {row.attempts}, spread {row.time_min_s:.2f}–{high})"
    return text


def final_text(row: Any, metric: str) -> str:
    """The final metric; with several seeds, ± the half-width of its 95% interval."""
    text = metric_text(row.final, metric)
    if row.final_interval is not None:
        text += f" ± {metric_text(row.final_interval, metric)}"
    return text


def verdict(summary: Any) -> str:
    """Who reached the target first and whether the lead holds across repeats; implausible
    speedups, diverging runs, a noisy machine; which run ended best."""
    metric, rows = summary.metric, summary.rows
    reference = next((r for r in rows if r.label == summary.reference), None)
    reached = _reached(rows)
    winner, leaders = lead(rows)
    sentences = []
    if not reached:
        sentences.append(f"No strategy reached the target ({metric_text(summary.target, metric)})"
                         + (" without diverging." if any(r.diverging for r in rows) else "."))
    elif winner is None:
        sentences.append("No clear winner: the times to target of " + ", ".join(
            f"**{r.label}** {_time(r)}" for r in leaders) + " overlap across repeats.")
    else:
        text = ("Measured: " if getattr(summary, "link", None) else "") + \
            f"**{winner.label}** reached the target first, after {_time(winner)}"
        if reference is not None and winner is not reference:
            if reference.time_to_target_s is None:
                text += f"; {reference.label} did not reach it"
            elif winner.speedup is not None:
                text += f": {winner.speedup:.2f}× the speed of {reference.label} ({reference.time_to_target_s:.2f} s)"
        if len(reached) > 1 and reached[1] is not reference:
            runner_up = reached[1]
            text += (f", {runner_up.time_to_target_s / winner.time_to_target_s:.2f}× the speed of the "
                     f"runner-up {runner_up.label} ({runner_up.time_to_target_s:.2f} s)")
        sentences.append(text + ".")
        if len(reached) > 1 and winner.attempts < 2:
            sentences.append("Each run was measured once, so this lead is not checked against timing "
                             "noise (use --repeat 3).")
    if getattr(summary, "link", None):
        sentences.append(link_verdict(summary))
    loaded = noisy(summary.load, summary.cores)
    for row in rows:
        if row.implausible:
            cause = ("the machine was loaded while the runs took turns" if loaded else
                     f"{summary.reference} was slowed, most likely by thread oversubscription "
                     "(more intra-op threads than cores) or by other work on the machine")
            sentences.append(f"{row.label}'s {row.speedup:.2f}× speedup is implausible: {row.workers} "
                             f"worker(s) on {summary.cores} core(s) can give at most about "
                             f"{speedup_limit(row.workers, summary.cores):.2f}×; likely cause: {cause}.")
    divergent = [r.label for r in rows if r.diverging]
    if divergent:
        sentences.append(f"Diverging (validation loss rose well above its best): {', '.join(divergent)}.")
    finals = [r for r in rows if r.final is not None]
    if finals:
        best_final = (max if higher_is_better(metric) else min)(finals, key=lambda r: r.final)
        name = "accuracy" if higher_is_better(metric) else "loss"
        tied = [r.label for r in finals if r.final == best_final.final]
        if len(tied) == len(rows) > 1:
            sentences.append(f"Every run ended at {final_text(best_final, metric)} validation {name}.")
        else:
            sentences.append(f"Best final validation {name}: {', '.join(tied)}, {final_text(best_final, metric)}.")
    missed = [r.label for r in rows if r.time_to_target_s is None]
    if missed and reached:
        sentences.append(f"Not reached by: {', '.join(missed)}.")
    slow_start = [f"{r.label} ({r.startup_s:.2f} s of {r.time_to_target_s:.2f} s)" for r in reached
                  if r.startup_s > 0.5 * r.time_to_target_s > 0]
    if slow_start:
        sentences.append(f"Start-up was over half the time to target for {', '.join(slow_start)}.")
    if loaded:
        before, after = summary.load
        sentences.append(f"Noisy machine: its load average was {before:.2f} before and {after:.2f} after "
                         f"the runs, above its {summary.cores} core(s); times are not reliable.")
    return " ".join(sentences)
