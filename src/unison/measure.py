"""How compare measures its runs fairly: one compute budget for every run, interleaved repeats,
the intra-op thread count fastest for a one-worker run, a warm start, and the machine's load.

The budget rule: every run may use all C cores of this machine and no more; a run with N
workers gives each threads-per-worker = C // N intra-op threads (N × threads ≤ C), a run with
one worker (single) gets the count fastest for it, 1 or C, found by a short calibration unless
the user pinned one.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Sequence

from . import api
from .errors import UnisonError
from .launch import cpu_cores, pinned_threads
from .plan import world_size


def schedule(labels: Sequence[str], repeats: int, seeds: int) -> list[tuple[str, int, int]]:
    """The order of a comparison's runs as (label, seed index, repeat index): one pass over
    the labels per (seed, repeat), every other pass reversed (A B C, C B A, A B C, ...), so
    that no run is always first or last when the machine warms up or gets busy."""
    order = []
    for number in range(seeds * repeats):
        seed, repeat = divmod(number, repeats)
        for label in (labels if number % 2 == 0 else list(reversed(labels))):
            order.append((label, seed, repeat))
    return order


def attempt_dir(dir_name: str, seed: int, repeat: int) -> str:
    """A run's folder for one attempt: the first attempt keeps the run's own folder name."""
    return dir_name if (seed, repeat) == (0, 0) else f"{dir_name}.seed{seed}.rep{repeat + 1}"


def machine_load() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # pragma: no cover - not Unix
        return None


def budget_rule(cores: int) -> str:
    return (f"each run may use all {cores} core(s): N workers × threads per worker ≤ {cores}; "
            "a one-worker run uses the intra-op thread count fastest for it")


def budget_table(threads: int, timed: dict[int, float] | None) -> dict[str, Any]:
    """The measurement rule as config.toml's [compare.budget] records it (the report states it)."""
    cores = cpu_cores()
    table: dict[str, Any] = {"rule": budget_rule(cores), "cores": cores, "single_threads": threads,
                             "single_threads_from": "pinned (--threads)" if timed is None else "calibrated"}
    if timed:
        table["calibration_s"] = {str(k): v for k, v in timed.items()}
    return table


def calibrate_threads(train: Callable[[], Any], cores: int, rounds: int = 2) -> tuple[int, dict[int, float]]:
    """The intra-op thread count (1 or ``cores``) with which ``train()`` ran fastest, timed
    ``rounds`` times each in alternating order (best of each), and those times."""
    counts = [1] if cores <= 1 else [1, cores]
    times: dict[int, float] = {}
    for number in range(rounds):
        for threads in (counts if number % 2 == 0 else counts[::-1]):
            with pinned_threads(threads):
                started = time.perf_counter()
                train()
                times[threads] = min(times.get(threads, float("inf")), time.perf_counter() - started)
    return min(times, key=times.get), {k: round(v, 4) for k, v in times.items()}


def sample_of(data: Any, n: int) -> Any:
    return dataclasses.replace(data, x=data.x[:n], y=data.y[:n], x_val=data.x_val[:n], y_val=data.y_val[:n])


def single_threads(model: Any, data: Any, config: Any, callables: dict[str, Any], pinned: int | None,
                   ) -> tuple[int, dict[int, float] | None]:
    """The intra-op threads for one-worker runs: ``pinned``, else calibrated on one epoch of
    64 batches with threads (the loop is the same under every backend)."""
    if pinned is not None:
        return pinned, None
    sample = sample_of(data, min(len(data.x), 64 * config.batch_size))
    short = dataclasses.replace(config, strategy="single", backend="threads", epochs=1, workers=1)

    def train() -> None:
        try:
            api.run(short, model, sample, **callables, progress=False)
        except UnisonError:
            pass
    return calibrate_threads(train, cpu_cores())


def warm_up(model: Any, data: Any, configs: dict[str, Any], callables: dict[str, Any]) -> None:
    """Train one worker for a moment on a few samples, so that one-off costs of this process
    (torch imports its compiler stack lazily at the first optimizer step, about a second) are
    not charged to whichever run comes first; and wait for the worker processes' forkserver to
    finish importing torch (~1.5 s), which would otherwise be charged to the first run with
    workers, and slow a one-worker run that trains while it imports. Every run is thus measured
    with a warm start. Its failures are left to the real runs."""
    if any(c.backend == "processes" and world_size(c) > 1 for c in configs.values()):
        from .launch import processes

        processes.wait_until_ready()
    first = next(iter(configs.values()))
    sample = sample_of(data, 2 * first.batch_size)
    try:
        config = dataclasses.replace(first, strategy="single", backend="threads", epochs=1)
        api.run(config, model, sample, **callables, progress=False)
    except UnisonError:
        pass
