"""Experiment 3, localsgd: local SGD keeps close to linear speed-up in workers while it
communicates H× less, up to an H that grows with the run (Stich 2019)."""

from __future__ import annotations

import math
from typing import Sequence

from ..config import ModelConfig
from ..summary import Records
from .base import Context, Experiment, Finding, differences, first_reaching, median, per_seed

LR = 0.05          # one worker's SGD step (compare's default lr); N workers take N·LR
BATCH, EPOCHS = 4, 16
HALF_LINEAR = 0.5  # finding (a): a speed-up of at least half of linear
FULL_FALL = 0.9    # finding (b): merges fall at least 0.9·H× (the last round of a run may be short)
SMALL_H, LARGE_H = (1, 4, 16), 64


def grid(quick: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The worker counts (beside the one-worker baseline) and merge intervals H trained."""
    if quick:
        return (16,), (1, 16, LARGE_H)
    return (2, 4, 8, 16), SMALL_H + (LARGE_H,)


def label(workers: int, every: int) -> str:
    return f"N={workers} H={every}"


def merges(records: Records) -> float:
    """The strategy's collectives of a run (its merges), counted in its records."""
    return float(sum(calls for record in records for calls, _ in (record.get("collectives") or {}).values()))


def target_loss(baseline: Sequence[Records]) -> float:
    """The validation loss one worker reaches halfway through its run (median over seeds):
    N workers at half of linear speed-up reach it by the end of theirs."""
    return median([float(records[len(records) // 2 - 1]["val_loss"]) for records in baseline])


def speedups(single_steps: Sequence[float], steps: Sequence[float], last_steps: Sequence[float]) -> list[float]:
    """Per seed, steps(1 worker) / steps(N workers) to the target. A run that missed it gets
    the most it could have had, steps(1) / its last step (above the true speed-up; finding 1
    counts such a run as below half of linear whatever this bound says)."""
    return [one / (s if not math.isnan(s) else last) for one, s, last in zip(single_steps, steps, last_steps)]


def on_grid(step: float, grid: Sequence[float]) -> float:
    """``step`` moved to the first of ``grid`` (another run's record steps) at or after it: what
    that run's coarser records could have shown (``step`` itself past the grid's end)."""
    if math.isnan(step):
        return step
    return next((g for g in grid if g >= step), step)


def measure(context: Context) -> list[Finding]:
    workers, everies = grid(context.quick)
    runs = {label(1, 1): {"strategy": "periodic(every=1)", "workers": 1, "lr": LR}}
    runs |= {label(n, h): {"strategy": f"periodic(every={h})", "workers": n, "lr": LR * n}
             for n in workers for h in everies}
    loaded = context.compare("speedup", runs, model=ModelConfig(hidden=()), batch_size=BATCH, epochs=EPOCHS,
                             momentum=0.0)
    records = {name: per_seed(loaded, name, lambda r: r) for name in runs}
    target = target_loss(records[label(1, 1)])
    reach = first_reaching(target, metric="val_loss")
    steps = {name: [reach(r) for r in records[name]] for name in runs}
    last = {name: [float(r[-1]["step"]) for r in records[name]] for name in runs}
    one = steps[label(1, 1)]
    speedup = {name: speedups(one, steps[name], last[name]) for name in runs if name != label(1, 1)}
    top = max(workers)
    small = [h for h in everies if h in SMALL_H]
    resolution = ", ".join(f"H={h}: {median(steps[label(top, h)]):.0f}" for h in everies)

    def fraction(n: int, h: int) -> list[float]:
        """Speed-up over N; a run that missed the target is at most half of linear (it fails)."""
        return [s / n if not math.isnan(reached) else min(s / n, HALF_LINEAR)
                for s, reached in zip(speedup[label(n, h)], steps[label(n, h)])]
    near_linear = [label(n, h) for n in workers for h in small]
    findings = [Finding(
        claim=f"at H ≤ {max(small)} local SGD on {', '.join(map(str, workers))} workers keeps at least half of "
              f"linear speed-up (speed-up ≥ N/2 in steps per worker to val loss {target:.3f})",
        metric="speed-up over one worker (steps to target)", arms={name: speedup[name] for name in near_linear},
        effect=f"the smallest speed-up / N − {HALF_LINEAR:g} over those runs",
        effects=[min(values) - HALF_LINEAR for values in zip(*(fraction(n, h) for n in workers for h in small))])]
    merged = {label(top, h): [merges(r) for r in records[label(top, h)]] for h in everies}
    fall = [[m1 / mh / h for m1, mh in zip(merged[label(top, 1)], merged[label(top, h)])] for h in everies if h > 1]
    findings.append(Finding(
        claim=f"communication falls H×: {top} workers merging every H steps make 1/H of the merges of H=1 "
              f"(true of periodic by construction; a check that the collectives counted in the records, "
              f"what the link model times, fall at least {FULL_FALL:g}·H×)",
        metric="merges per run", arms=merged,
        effect="the smallest (merges at H=1 / merges at H) / H over H > 1", effects=[min(v) for v in zip(*fall)],
        threshold=FULL_FALL))
    # H=1 is recorded every step, H=64 every 64: compare them on H=64's records, or a reach
    # between two of them would count as a slowdown that H=64's records could not have shown
    grids = [[float(r["step"]) for r in runs] for runs in records[label(top, LARGE_H)]]
    synced = [on_grid(step, grid) for step, grid in zip(steps[label(top, 1)], grids)]
    coarse_sync = speedups(one, synced, last[label(top, 1)])
    findings.append(Finding(
        claim=f"the speed-up degrades at the largest H: {top} workers at H={LARGE_H} reach the target later "
              f"than at H=1 (steps to target, median, by H — {resolution}; records come at merges, so H=1 is read "
              f"on H={LARGE_H}'s {LARGE_H}-step grid)",
        metric="speed-up over one worker (steps to target)",
        arms={label(top, h): speedup[label(top, h)] for h in everies},
        effect=f"speed-up at H=1, read on H={LARGE_H}'s record steps, − at H={LARGE_H}",
        effects=differences(coarse_sync, speedup[label(top, LARGE_H)])))
    return findings


EXPERIMENT = Experiment(
    name="localsgd",
    paper="Stich 2019, Local SGD Converges Fast and Communicates Little (ICLR)",
    claim="Local SGD — N workers each taking H SGD steps, then averaging — converges at the rate of mini-batch "
          "SGD in the number of gradients evaluated, so it keeps a linear speed-up in the workers while it "
          "communicates H times less, for H up to a bound that grows with the length of the run.",
    paper_figure="From the abstract (the figures were not verified here): local SGD \"converges at the same rate "
                 "as mini-batch SGD in terms of number of evaluated gradients, that is, the scheme achieves linear "
                 "speedup in the number of workers and mini-batch size. The number of communication rounds can be "
                 "reduced up to a factor of T^{1/2}\".",
    setup=f"Logistic regression (one linear layer) on digits (1797 8×8 images, 20% held out), plain SGD "
          f"(no momentum, batch {BATCH}, {EPOCHS} epochs) on the stacked backend. One worker with lr {LR} "
          f"(compare's default) is the baseline; N ∈ {{2, 4, 8, 16}} workers each get 1/N of the data "
          f"(shard) and lr N·{LR} (the linear scaling rule, so that N workers may go N× faster), and average "
          f"their models every H ∈ {{1, 4, 16, 64}} steps (periodic(every=H); H=1 is synchronous SGD). Every run "
          "sees the same samples (the same epochs): at linear speed-up N workers need 1/N of the steps. The "
          "target is the validation loss one worker reaches halfway through its run (median over seeds); "
          "steps per worker to it are read from the records, which come at each merge (every step for H=1 and "
          "the baseline, every H steps otherwise). Speed-up = steps(1 worker) / steps(N workers); a run that "
          "never reaches the target counts steps(1) / its last step (an upper bound on its speed-up) and fails "
          "the half-of-linear finding whatever that bound. The H=64 finding reads H=1's steps on H=64's "
          "record grid (the first H=64 record at or after H=1's reach), so the coarser records do not count "
          "as a slowdown. Merges are the all-reduce calls the records count.",
    quick_note="16 workers only (not 2, 4, 8, 16) and H ∈ {1, 16, 64} (not 1, 4, 16, 64).",
    caveat="Digits gives 16 workers only 90 samples each (23 steps an epoch), so the 16-worker runs are 368 "
           "steps long and reach the target around step 200: at H=64 the averaged model exists only every 64 "
           "steps, and part of a measured loss of speed-up at H=64 is that coarse resolution. The theory is "
           "about convex problems and rates as T grows; unison uses a constant lr scaled with N, "
           "which gives synchronous SGD its speed-up on a convex problem this small and is where local SGD's "
           "drift shows. In a trial with a smaller lr (0.01·N, seed 0, 10 epochs) H=64 lost nothing to H=1: "
           "the drift, and so finding 3, depends on the step size.",
    measure=measure,
)
