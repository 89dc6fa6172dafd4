"""compare(): the same model, data and seed trained with several strategies, one run after
another, then a summary, plots and an HTML report of which reached a good model fastest.

Everything is checked before the first worker starts. A strategy the backend cannot run (or
whose settings it refuses) is skipped with the reason printed; a run whose workers fail is
reported as failed and the comparison goes on. The output directory is written in scratch
and appears only when complete; an existing one is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import dataclasses
import platform
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import tomli_w
import torch
from torch import nn

from . import api, history, launch, linkmodel, measure, report, rundir
from . import summary as summaries
from . import verdict as verdicts
from .api import Result
from .config import DataConfig, ModelConfig, RunConfig, TrainConfig, from_dict
from .data import prepare
from .errors import ConfigError, UnisonError, WorkerError, expected
from .launch import cpu_cores
from .models import mlp
from .plan import start_early, world_size
from .strategies import REGISTRY, Strategy, parse
from .validators import check_float, check_int

# The embedded default: digits, an MLP with one hidden layer of 64, 2 workers on processes.
DEFAULT_STRATEGIES = ("single", "sync", "periodic(every=epoch)", "periodic(every=16)", "oneshot")
DEFAULTS = {"data": {"dataset": "digits", "val_fraction": 0.2}, "model": {"hidden": [64]},
            "train": {"workers": 2, "backend": "processes", "partition": "shard", "epochs": 20,
                      "batch_size": 16, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "seed": 0}}
# Every TrainConfig field is a keyword of fit(); compare passes them all through, so settings
# added to TrainConfig later reach every run. A run may set any of them but these differently.
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# A run may differ from the others in anything but the seed (same data split and start) and
# the timeout; its backend may differ too, e.g. periodic on processes against periodic stacked.
RUN_OPTIONS = tuple(name for name in TRAIN_FIELDS if name not in ("seed", "timeout"))
# Backends that fit() launches itself, so that compare can run them one after another here.
BACKENDS = tuple(name for name, backend in launch.REGISTRY.items() if backend.in_process)
_TRAIN = DEFAULTS["train"]
# Every run measured three times, interleaved (the default comparison took ~20 s at repeat 2 on a
# loaded 2-core VM: far below the 3 minutes a default may take).
DEFAULT_REPEAT = 5


def default_strategies() -> list[str]:
    """The default list plus every other registered strategy, with its default options: a
    strategy added to unison.strategies.REGISTRY later joins the comparison by itself, unless
    it opts out (``Strategy.compared_by_default``: fedbuff, run by --strategies only)."""
    covered = {parse(spec).name for spec in DEFAULT_STRATEGIES}
    return list(DEFAULT_STRATEGIES) + [name for name, cls in REGISTRY.items()
                                       if name not in covered and cls.compared_by_default]


def split_specs(text: str) -> list[str]:
    """``"sync,periodic(every=8, warmup=2)"`` → ``["sync", "periodic(every=8, warmup=2)"]``:
    commas inside parentheses belong to a strategy's options."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part.strip() for part in parts if part.strip()]


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a comparison: a label, its strategy and what it sets differently."""

    label: str
    strategy: Strategy
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def dir_name(self) -> str:
        return dir_name(self.label)


def dir_name(label: str) -> str:
    """A run's folder name in a comparison directory, from its label."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", label).strip("-.") or "run"


def plan(strategies: Any = None) -> tuple[list[Run], dict[str, str]]:
    """Runs from None (the default list), ``"a,b"``, a list of specs or Strategy objects, or a
    mapping label → spec, Strategy, or a dict of run options (strategy, partition, workers, ...).
    Also returns the registered strategies the default list leaves out, with the reason: those
    that cannot be built without options."""
    unavailable: dict[str, str] = {}
    if strategies is None:
        strategies = []
        for spec in default_strategies():
            try:
                parse(spec)
                strategies.append(spec)
            except (ConfigError, TypeError) as exc:
                unavailable[spec] = f"it cannot be built with its default options ({exc})"
    if isinstance(strategies, str):
        strategies = split_specs(strategies)
    elif isinstance(strategies, Strategy):
        strategies = [strategies]
    if isinstance(strategies, Mapping):
        items = list(strategies.items())
    elif isinstance(strategies, (list, tuple)):
        items = [(s.spec() if isinstance(s, Strategy) else str(s).strip(), s) for s in strategies]
    else:
        raise ConfigError(expected("strategies", strategies, "names such as 'single,sync', a list of "
                                   "names or Strategy objects, or a mapping label -> strategy"))
    runs, seen = [], set()
    for label, value in items:
        options = dict(value) if isinstance(value, Mapping) else {"strategy": value}
        unknown = [key for key in options if key not in RUN_OPTIONS]
        if unknown or "strategy" not in options:
            raise ConfigError(f"run {label!r}: " + (f"unknown option {unknown[0]!r}" if unknown else
                              "no strategy") + f"; accepted: {', '.join(RUN_OPTIONS)}")
        label = str(label)
        run = Run(label, parse(options.pop("strategy")), options)
        if label in seen or run.dir_name in {r.dir_name for r in runs}:
            raise ConfigError(f"strategies: {label!r} is listed twice; give each run its own label")
        seen.add(label)
        runs.append(run)
    if not runs:
        raise ConfigError(expected("strategies", strategies, "at least one strategy, e.g. 'single,sync'"))
    return runs, unavailable


@dataclasses.dataclass
class Comparison:
    """What compare() returns: each run's Result (its first attempt), the summary table (every
    attempt) and where it was written."""

    results: dict[str, Result]
    summary: summaries.Summary
    skipped: dict[str, str]
    out: Path

    def table(self) -> str:
        """The summary as Markdown (the table, the target and the verdict)."""
        return summaries.markdown(self.summary)

    @property
    def winner(self) -> str | None:
        """The label of the run that reached the target first by a lead that holds across
        repeats, without diverging (None if none did: see the verdict for the leaders); with a
        ``link``, on that link, from the modelled times (unison.linkmodel)."""
        winner, _ = verdicts.lead(verdicts.on_link(self.summary.rows) if self.summary.link else self.summary.rows)
        return None if winner is None else winner.label


def compare(model: nn.Module | Callable[[], nn.Module] | ModelConfig | None = None, data: Any = "digits",
            val: Any = None, *, strategies: Any = None, workers: int = _TRAIN["workers"],
            backend: str = _TRAIN["backend"], partition: Any = _TRAIN["partition"],
            epochs: int = _TRAIN["epochs"], batch_size: int = _TRAIN["batch_size"],
            optimizer: str | Callable = _TRAIN["optimizer"], lr: float = _TRAIN["lr"],
            momentum: float | None = None, seed: int = _TRAIN["seed"], label: str | None = None,
            target: float | None = None, target_fraction: float = summaries.TARGET_FRACTION,
            out: str | Path | None = None, overwrite: bool = False, progress: bool = True,
            tensorboard: bool = False, repeat: int = DEFAULT_REPEAT, seeds: int = 1, threads: int | None = None,
            link: str | None = None, **train: Any) -> Comparison:
    """Train ``model`` on ``data`` once per strategy and write the comparison to ``out``.

    ``model``: an nn.Module, a factory, a ModelConfig (an MLP sized to the data) or None (an
    MLP with one hidden layer of 64). ``data``/``val``/``label``: as unison.fit and
    unison.data.prepare; a validation set is required. ``strategies``: see plan(); by default
    single, sync, periodic(every=epoch), periodic(every=16), oneshot and every other
    registered strategy. ``target``: the validation accuracy (loss, for regression) that
    times are measured to; by default ``target_fraction`` of single's best accuracy.
    ``momentum``: None means 0.9 with SGD and 0 with other optimizers. ``out``: default
    runs/<date-time>-compare. ``repeat``: times each run is measured, in interleaved order
    (A B C, C B A, ...): times are medians with their spread. ``seeds``: each run is also
    trained with seeds seed, seed+1, ...: finals are means ± a 95% t interval. ``threads``:
    the intra-op threads of one-worker runs (default: 1 or every core, whichever a short
    calibration finds faster); runs with N workers give each cores // N. ``link``: e.g.
    "100mbit,20ms": adds each run's modelled times on that link (unison.linkmodel). Every other
    training setting of unison.fit (weight_decay, loss, timeout, ...) is accepted as a
    keyword and applies to every run.
    """
    runs, skipped = plan(strategies)
    if backend not in BACKENDS:
        raise ConfigError(expected("backend", backend, BACKENDS) + "; compare runs its strategies one after "
                          "another in this process (under torchrun, use `unison train` per strategy)")
    unknown = [key for key in train if key not in TRAIN_FIELDS or key == "strategy"]
    if unknown:
        raise ConfigError(f"compare() has no setting {unknown[0]!r}; accepted training settings: "
                          f"{', '.join(name for name in TRAIN_FIELDS if name != 'strategy')}")
    if momentum is None:
        momentum = _TRAIN["momentum"] if optimizer == "sgd" else 0.0
    common = train | dict(workers=workers, backend=backend, partition=partition, epochs=epochs,
                          batch_size=batch_size, optimizer=optimizer, lr=lr, momentum=momentum, seed=seed)
    configs = {run.label: _train_config(common | run.options | {"strategy": run.strategy}) for run in runs}
    check_float("target_fraction", target_fraction, low=0.0, high=1.0, low_open=True, high_open=False)
    check_int("repeat", repeat, minimum=1, maximum=100)
    check_int("seeds", seeds, minimum=1, maximum=100)
    link = None if link is None else linkmodel.parse(link).spec()
    if threads is not None:
        check_int("threads", threads, minimum=1, maximum=cpu_cores())
    loss = train.get("loss")
    for config in configs.values():
        start_early(config)  # the workers' interpreter starts while the data is prepared
    train_data = prepare(data, val, seed=seed, loss=loss if isinstance(loss, str) else None, label=label)
    if train_data.x_val is None:
        raise ConfigError("compare needs validation data to judge the strategies: pass val= (a fraction "
                          "such as 0.2, or (X, y)) or a named data set (which holds out 20%)")
    _check_target(target, train_data.task)
    out = Path(out) if out is not None else rundir.default_out("compare")
    rundir.check_free(out, overwrite)
    if tensorboard:
        history.tensorboard_writer_class()  # ConfigError now, not after the first run
    model_table, build_model = _model(model, train_data)

    settings = _settings(train_data, data, val, label, model_table, model, common, runs, configs, target,
                         target_fraction)
    settings["compare"] |= {"link": link} if link else {}  # the report models it (unison.linkmodel)
    scratch = rundir.scratch_for(out)
    results: dict[str, Result] = {}
    for name, reason in skipped.items():
        print(f"{name}: skipped, {reason}", file=sys.stderr)
    if progress:
        print(f"unison compare: {len(runs) * repeat * seeds} runs ({len(runs)} strategies × {repeat} repeat(s) × "
              f"{seeds} seed(s)) on {train_data.name}, {workers} workers on {backend}; warming up", flush=True)
    try:
        scratch.mkdir(parents=True)
        load_before = measure.machine_load()
        measure.warm_up(build_model, train_data, configs, _callables(common))
        one = measure.single_threads(build_model, train_data, next(iter(configs.values())), _callables(common),
                                     threads)
        settings["compare"] |= {"repeat": repeat, "seeds": seeds, "budget": measure.budget_table(*one)}
        by_label, order = {run.label: run for run in runs}, measure.schedule([run.label for run in runs], repeat, seeds)
        attempts: dict[str, list[dict[str, Any]]] = {run.label: [] for run in runs}
        for number, (name, k, r) in enumerate(order, start=1):
            run, tag = by_label[name], f" (seed {seed + k}, repeat {r + 1})" if len(order) > len(runs) else ""
            if name in skipped:
                continue
            config = dataclasses.replace(configs[name], seed=seed + k)
            folder = measure.attempt_dir(run.dir_name, k, r)
            with launch.pinned_threads(one[0] if world_size(config) == 1 else None):
                outcome = _run_one(run, config, build_model, train_data, common, scratch, settings, folder,
                                   progress=progress, tensorboard=tensorboard)
            if isinstance(outcome, str):
                skipped[name] = outcome
                results.pop(name, None)
                for done in attempts.pop(name):
                    shutil.rmtree(scratch / done["dir"], ignore_errors=True)
                print(f"[{number}/{len(order)}] {name}{tag}: skipped, {outcome}", file=sys.stderr)
                continue
            results.setdefault(name, outcome)
            attempts[name].append({"dir": folder, "seed": seed + k, "repeat": r + 1})
            if progress:
                print(f"[{number}/{len(order)}] {name}{tag}: {_line(outcome)}", flush=True)
        results = {run.label: results[run.label] for run in runs if run.label in results}
        load = {"load_before": load_before, "load_after": measure.machine_load()}
        settings["compare"]["machine"] |= {k: v for k, v in load.items() if v is not None}  # TOML has no None
        for name, done in attempts.items():
            settings["compare"]["runs"][name]["attempts"] = done
        if not results:
            first = next(iter(skipped.values()))
            error = WorkerError if first.startswith("failed") else ConfigError
            raise error(f"no strategy could run; {next(iter(skipped))}: {first}")
        if skipped:
            settings["compare"]["skipped"] = skipped
        (scratch / report.CONFIG_FILE).write_text(_toml(settings))
        summary = report.build(scratch)
        rundir.replace_dir(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return Comparison(results=results, summary=summary, skipped=skipped, out=out)


def _check_target(target: float | None, task: str) -> None:
    if target is None:
        return
    if task == "classification":
        check_float("target", target, low=0.0, high=1.0, low_open=True, high_open=False)
    else:
        check_float("target", target, low=0.0, low_open=True)


def _run_one(run: Run, config: TrainConfig, model: Any, data, common: dict[str, Any], scratch: Path,
             settings: dict[str, Any], folder: str, *, progress: bool, tensorboard: bool) -> Result | str:
    """One attempt of a run into ``scratch/<folder>``: its Result, or why it did not run."""
    reason = _cannot_run(config)
    if reason is not None:
        return reason
    try:
        started = time.time()
        result = api.run(config, model, data, **_callables(common), progress=progress, log_dir=scratch / folder)
    except (ConfigError, WorkerError) as exc:
        shutil.rmtree(scratch / folder, ignore_errors=True)
        return f"{'refused' if isinstance(exc, ConfigError) else 'failed'}: {exc}"
    _write_run(scratch / folder, settings, config, result)
    if tensorboard:
        history.write_tensorboard(result.history, scratch / "tensorboard" / folder, started=started)
    return result


def _train_config(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig for one run: every value checked now, before any worker starts."""
    values = dict(values)
    for key in ("optimizer", "loss"):
        if callable(values.get(key)):
            values[key] = "custom"
    return TrainConfig(**values)


def _callables(common: dict[str, Any]) -> dict[str, Any]:
    """The caller's own optimizer and loss callables, where the configs only say "custom"."""
    return {key: common[key] for key in ("optimizer", "loss") if callable(common.get(key))}


def _cannot_run(config: TrainConfig) -> str | None:
    missing = config.strategy.needs - launch.get(config.backend).offers
    if missing:
        return (f"it needs {', '.join(sorted(missing))}, which backend {config.backend!r} lacks")
    return None


def _model(model: Any, data) -> tuple[dict[str, Any] | None, Any]:
    """The model to train (a module or factory) and its [model] table when it is an MLP."""
    if model is None:
        model = ModelConfig(hidden=tuple(DEFAULTS["model"]["hidden"]))
    if not isinstance(model, ModelConfig):
        return None, model
    table = RunConfig(model=model).to_dict()["model"]

    def build() -> nn.Module:
        return mlp(data.features, list(model.hidden), data.outputs, activation=model.activation,
                   dropout=model.dropout, batchnorm=model.batchnorm)
    return table, build


def _settings(train_data, data, val, label, model_table, model, common, runs, configs, target, fraction) -> dict:
    """The resolved settings written to config.toml: tables a compare run file also takes."""
    data_table: dict[str, Any] = {"dataset": data if isinstance(data, str) else train_data.name}
    if isinstance(val, float) or (val is None and isinstance(data, str)):
        data_table["val_fraction"] = DataConfig().val_fraction if val is None else val
    if label is not None:
        data_table["label"] = label
    train = {k: v for k, v in RunConfig(train=_train_config(common | {"strategy": "single"}))
             .to_dict()["train"].items() if k != "strategy"}
    compare_table: dict[str, Any] = {
        "strategies": [run.label for run in runs],
        "reference": next((run.label for run in runs if run.strategy.name == "single"), runs[0].label),
        "target_fraction": fraction,
        "runs": {run.label: {"dir": run.dir_name, "strategy": run.strategy.spec(),
                             **{k: _plain(v) for k, v in run.options.items()}} for run in runs},
        # how many workers each run had (single: 1), as the plan decided: what the report shows
        # (fedbuff's server rank trains nothing and is not counted)
        "world_sizes": {run.label: world_size(configs[run.label]) - configs[run.label].strategy.servers
                        for run in runs},
        "machine": {"cores": cpu_cores(), "python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(terse=True)},
    }
    if target is not None:
        compare_table["target"] = target
    if model_table is None:
        compare_table["model"] = f"custom: {type(model).__name__ if isinstance(model, nn.Module) else 'factory'}"
    settings: dict[str, Any] = {"data": data_table}
    if model_table is not None:
        settings["model"] = model_table
    return settings | {"train": train, "compare": compare_table}


def _plain(value: Any) -> Any:
    return value.spec() if hasattr(value, "spec") else value


def _toml(settings: dict[str, Any]) -> str:
    note = ""
    if "model" not in settings:
        note = "# The model was a Python object; this file records the other settings only.\n"
    return note + tomli_w.dumps(settings)


def _write_run(path: Path, settings: dict[str, Any], config: TrainConfig, result: Result) -> None:
    """Beside fit()'s history.jsonl and model.safetensors: the run's config.toml (the format
    `unison train` reads) and its summary.txt."""
    tables = {"data": settings["data"], "train": RunConfig(train=config).to_dict()["train"]}
    if "model" in settings:
        tables["model"] = settings["model"]
    (path / report.CONFIG_FILE).write_text(tomli_w.dumps(tables))
    (path / "summary.txt").write_text(result.summary() + "\n")


def _line(result: Result) -> str:
    final = result.final
    metric = "val_acc" if "val_acc" in final else "val_loss"
    value = summaries.metric_text(final.get(metric), metric)
    best = summaries.metric_text(summaries.best(result.history, metric), metric)
    name = "val acc" if metric == "val_acc" else "val loss"
    return (f"final {name} {value} (best {best}), {result.wall_s:.1f} s "
            f"(start-up {result.startup_s:.1f} s), {len(result.history)} round(s)")


def load_settings(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> tuple[RunConfig, dict]:
    """A compare run file: [data], [model] and [train] as for `unison train` (train.strategy
    is not used) plus an optional [compare] table: strategies, target, target_fraction, runs."""
    raw = dict(raw)
    options = dict(raw.pop("compare", {}) or {})
    settings = ("strategies", "runs", "target", "target_fraction", "repeat", "seeds", "threads", "link")
    recorded = ("reference", "skipped", "machine", "model", "world_sizes", "budget")
    for key in options:
        if key not in settings + recorded:  # what compare records in config.toml is read back and ignored
            raise ConfigError(f"unknown setting compare.{key}; accepted: {', '.join(settings)}")
    return from_dict(raw, overrides), options


def runs_from_options(options: Mapping[str, Any]) -> Any:
    """The strategies argument of compare() from a [compare] table: the specs in
    ``strategies`` in order, then the labelled runs of ``[compare.runs.<label>]`` (a label
    listed in both takes the table's settings). None when neither is given: the default."""
    runs = options.get("runs") or {}
    strategies = options.get("strategies")
    if not runs:
        return strategies
    listed = split_specs(strategies) if isinstance(strategies, str) else list(strategies or [])
    order = listed + [label for label in runs if label not in listed]
    return {label: {k: v for k, v in runs[label].items() if k not in ("dir", "attempts")} if label in runs else label
            for label in order}
