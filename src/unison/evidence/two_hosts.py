"""An experiment's part run over a real link between two hosts: two network namespaces joined by
a veth pair and limited with ``tc ... tbf`` (unison.netlab), each run the README's two-host
torchrun command (one process a host, each host on its own half of the cores).

The part is written as a comparison directory (a folder per arm and seed, [compare] in
config.toml), so ``report.load`` reads it and its report.html is the comparison's: these
runs' times are measured on the link, not modelled.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import tomli_w

from .. import measure, netlab, report
from ..comparison import dir_name
from ..config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ..launch import cpu_cores

HOSTS = 2


def available() -> str | None:
    """None when two hosts can be made here, else why not (root and iproute2 are needed)."""
    return netlab.available()


def link_rate(rate: str | None) -> float:
    """Bits per second one TCP stream gets over a fresh link of ``rate`` (None: unthrottled)."""
    with netlab.two_hosts(rate) as hosts:
        return netlab.throughput(hosts, seconds=1.0, rate=rate)


def compare(out: Path, strategies: Mapping[str, str], seeds: Sequence[int], *, rate: str | None,
            model: ModelConfig, target: float, cap: float, progress: bool = True, data: str = "digits",
            **train: Any) -> tuple[report.Loaded, list[str]]:
    """Every strategy (label → spec) with every seed, seed by seed (so a slow spell of the
    machine falls on all arms of a seed alike), ``train`` the [train] settings; a run still
    going after ``cap`` seconds is stopped and keeps its rounds so far. Returns the part
    loaded and a line for each run that failed (its arm has no value for that seed)."""
    configs = {label: RunConfig(data=DataConfig(dataset=data), model=model,  # checked before any host starts
                                train=TrainConfig(strategy=spec, workers=HOSTS, backend="processes", **train))
               for label, spec in strategies.items()}
    out.mkdir(parents=True)
    load_before, failures = measure.machine_load(), []
    attempts: dict[str, list[dict[str, Any]]] = {label: [] for label in strategies}
    for k, seed in enumerate(seeds):
        for label, config in configs.items():
            folder = measure.attempt_dir(dir_name(label), k, 0)
            run_file = out / f"{folder}.toml"
            run_file.write_text(dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed)).to_toml())
            run = netlab.train(run_file, out / folder, rate=rate, cap=cap)
            for i in range(HOSTS):  # each host's output beside (or, once it is written, in) the run
                log = out / f"{folder}.host{i}.log"
                if log.is_file() and (out / folder).is_dir():
                    shutil.move(log, out / folder / f"host{i}.log")
            run_file.unlink()
            if run.failure is not None or not run.records:
                failures.append(f"{label} (seed {seed}) on {rate or 'veth'}: "
                                + (run.failure or "no round recorded").strip().splitlines()[-1])
                continue
            if not run.finished:  # capped: keep its rounds so far as the run's history
                (out / folder).mkdir(exist_ok=True)
                (out / folder / report.HISTORY_FILE).write_text(
                    "".join(f"{json.dumps(r)}\n" for r in run.records))
            attempts[label].append({"dir": folder, "seed": seed, "repeat": 1})
            if progress:
                reached = next((r["wall_s"] - r.get("startup_s", 0.0) for r in run.records
                                if r.get("val_acc", 0.0) >= target), None)
                print(f"    {label} (seed {seed}) on {rate or 'veth'}: "
                      + (f"{target:.0%} after {reached:.2f} s of training" if reached is not None
                         else f"{target:.0%} not reached") + ("" if run.finished else f" (stopped at {cap:.0f} s)"),
                      file=sys.stderr, flush=True)
    settings = {"compare": {
        "strategies": list(strategies), "reference": next(iter(strategies)), "target": target,
        "runs": {label: {"dir": dir_name(label), "strategy": spec, "attempts": attempts[label]}
                 for label, spec in strategies.items() if attempts[label]},
        "world_sizes": {label: HOSTS for label in strategies},
        "machine": {"cores": cpu_cores()} | {k: v for k, v in (("load_before", load_before),
                                                                ("load_after", measure.machine_load())) if v is not None},
        "hosts": {"count": HOSTS, "processes_per_host": 1, "link": rate or "veth (unthrottled)"}}}
    (out / report.CONFIG_FILE).write_text(tomli_w.dumps(settings))
    if any(attempts.values()):
        report.build(out)
        return report.load(out), failures
    return report.Loaded(histories={}, settings=settings), failures

