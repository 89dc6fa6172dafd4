"""An experiment's part run over a real link between two hosts: two network namespaces joined by
a veth pair and limited with ``tc ... tbf`` (unison.netlab), each run the README's two-host
torchrun command (one process a host, each host on its own half of the cores).

The part is written as a comparison directory (a folder per arm and seed, [compare] in
config.toml), so ``report.load`` reads it and its report.html is the comparison's: these
runs' times are measured on the link, not modelled. A run that failed goes to ``failed/``
with its hosts' output and is listed as a failure; one stopped at the cap keeps its rounds.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import tomli_w

from .. import measure, netlab, report
from ..comparison import dir_name
from ..config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ..launch import cpu_cores

HOSTS = 2
FAILED = "failed"
_SEPARATOR = re.compile(r"^[\s=\-_*]*$")


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
    link = rate or "veth (unthrottled)"
    load_before, failures = measure.machine_load(), {}
    attempts: dict[str, list[dict[str, Any]]] = {label: [] for label in strategies}
    for k, seed in enumerate(seeds):
        for label, config in configs.items():
            folder = measure.attempt_dir(dir_name(label), k, 0)
            seeded = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
            failure, run = _run(out, folder, seeded, rate, cap)
            if failure is not None:
                failures.setdefault(label, []).append(f"{label} (seed {seed}) on {link}: {failure}")
                continue
            attempts[label].append({"dir": folder, "seed": seed, "repeat": 1})
            if progress:
                print(f"    {label} (seed {seed}) on {link}: {len(run.records)} round(s), final val acc "
                      f"{run.records[-1].get('val_acc', float('nan')):.2%}"
                      + ("" if run.finished else f" (stopped at {cap:.0f} s)"), file=sys.stderr, flush=True)
    tables = configs[next(iter(configs))].to_dict()
    tables["train"].pop("strategy")
    settings = tables | {"compare": {
        "strategies": list(strategies), "reference": next(iter(strategies)), "target": target,
        "runs": {label: {"dir": attempts[label][0]["dir"], "strategy": spec, "attempts": attempts[label]}
                 for label, spec in strategies.items() if attempts[label]},
        "world_sizes": {label: HOSTS for label in strategies},
        "machine": {"cores": cpu_cores()} | {k: v for k, v in (("load_before", load_before),
                                                                ("load_after", measure.machine_load())) if v is not None},
        "hosts": {"count": HOSTS, "processes_per_host": 1, "link": link}}}
    skipped = {label: "every seed failed; " + lines[0] for label, lines in failures.items() if not attempts[label]}
    if skipped:
        settings["compare"]["skipped"] = skipped
    (out / report.CONFIG_FILE).write_text(tomli_w.dumps(settings))
    if any(attempts.values()):
        report.build(out)
        loaded = report.load(out)
    else:
        loaded = report.Loaded(histories={}, settings=settings, skipped=skipped)
    return loaded, [line for lines in failures.values() for line in lines]


def _run(out: Path, folder: str, config: RunConfig, rate: str | None, cap: float) -> tuple[str | None, Any]:
    """One two-host run into ``out/folder``: (None, the run) if it recorded rounds (a capped
    run's partial directory becomes its folder), else (why, None) with its remains in failed/."""
    run_file, target = out / f"{folder}.toml", out / folder
    run_file.write_text(config.to_toml())
    try:
        run = netlab.train(run_file, target, rate=rate, cap=cap)
    except (OSError, subprocess.SubprocessError) as exc:  # the hosts could not be made or started
        home = out / FAILED / folder
        home.mkdir(parents=True, exist_ok=True)
        for log in out.glob(f"{folder}.host*.log"):
            shutil.move(log, home / log.name.removeprefix(f"{folder}."))
        return f"the hosts could not run it: `{str(exc).replace('`', chr(39))}`", None
    finally:
        run_file.unlink(missing_ok=True)
    if run.capped and run.records and run.partial is not None:
        os.replace(run.partial, target)
        (target / report.CONFIG_FILE).write_text(config.to_toml())
    home = target if run.records and target.is_dir() else out / FAILED / folder
    home.mkdir(parents=True, exist_ok=True)
    for i, log in enumerate(run.logs):
        if log.is_file():
            shutil.move(log, home / f"host{i}.log")
    if home == target:
        return None, run
    if run.partial is not None and run.partial.is_dir():
        shutil.move(run.partial, home / "partial")
    return f"`{_last_words(run.failure)}`" if run.failure else "no round was recorded", None


def _last_words(output: str) -> str:
    """The line of a failed host's output that says why: the last error line, else the last
    line that is not a separator (torchrun ends its summary with a row of '=')."""
    lines = [line.strip() for line in output.splitlines() if not _SEPARATOR.match(line)]
    errors = [line for line in lines if "Error" in line or "error:" in line or line.startswith("unison")]
    return (errors or lines or ["(no output)"])[-1].replace("`", "'")  # it is shown as code in the document
