"""fit() and train(): resolve a run's plan, launch it, build the Result.

``fit`` takes keyword settings, ``train`` a run file's RunConfig (what `unison train` runs,
with its run folder); both validate their settings once, as a TrainConfig, and hand it to
unison.plan.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from safetensors.torch import load_file
from torch import nn

from . import launch, rundir
from . import plan as plans
from .config import RunConfig, TrainConfig, from_dict
from .data import prepare
from .errors import ConfigError, WorkerError
from .history import read_jsonl
from .launch.torchrun import world_size as torchrun_world_size
from .plan import HISTORY_FILE, MODEL_FILE, RESUME_HINT
from .result import Result

__all__ = ["fit", "train", "prestart", "Result", "HISTORY_FILE", "MODEL_FILE", "RESUME_HINT"]


def prestart() -> None:
    """Start the interpreter that worker processes are forked from (a forkserver importing torch
    and unison, ~1.5 s) now, in the background, and return at once. ``import unison`` already
    does this unless UNISON_PRESTART=0 (or under torchrun); with the opt-out, call this first
    thing, before loading data, and the workers start in a fraction of a second. It is kept for
    later runs and ends with this interpreter."""
    launch.get("processes").prestart(workers=2)


def fit(model: nn.Module | Callable[[], nn.Module], data: Any, val: Any = None, *,
        strategy: Any = "periodic", workers: int | None = None, backend: str = "processes",
        partition: Any = "shard", epochs: int = 5, batch_size: int = 64,
        optimizer: str | Callable = "sgd", lr: float = 0.01, momentum: float = 0.0,
        nesterov: bool = False, weight_decay: float = 0.0, schedule: Any = None,
        penalty: Any = None, constraint: Any = None, loss: str | Callable | None = None, seed: int = 0,
        progress: bool = True, log_dir: str | Path | None = None, timeout: float = 300.0,
        device: str = "cpu", replicas_per_worker: int = 1,
        checkpoint_every: int | str | None = None, checkpoint_dir: str | Path | None = None,
        keep_checkpoints: int = 2, nan: str = "stop", resume: bool = False, label: str | None = None,
        speeds: Any = None, balance: str = "none", on_failure: str = "stop") -> Result:
    """Train ``workers`` replicas of ``model`` on ``data`` with ``strategy`` and merge them.

    ``model``: an nn.Module (its weights are every replica's start) or a zero-argument factory
    (called under ``torch.manual_seed(seed)``). ``data``/``val``: (X, y) arrays or tensors, a
    torch Dataset, a built-in name or a .csv/.npz/.pt file (``label``: a CSV file's label
    column, default the last); ``val`` may also be a fraction to hold out.
    ``workers``: 2 by default, torchrun's WORLD_SIZE on backend="torchrun" (``fedbuff`` runs
    one more rank, its server: there WORLD_SIZE − 1 workers).
    ``schedule``: None, "cosine", "step(every=10, gamma=0.1)" or "warmup(100)" (unison.schedules);
    ``penalty``: "l2(λ)", "l1(λ)", "elastic(λ1, λ2)"; ``constraint``: "max_norm(c)",
    "unit_ball(r)", "non_negative" (unison.penalties).
    ``backend="stacked"``: the ``workers`` replicas train as one batched computation in this
    process, on ``device`` ("cpu", "cuda", "cuda:N"); ``replicas_per_worker=R`` makes each
    process of backend "processes" or "torchrun" hold R stacked replicas (unison.engine.stacked).
    Everything is checked before any worker starts; problems raise unison.errors exceptions.

    Reliability: ``checkpoint_every`` (rounds, or a duration such as "10min") writes a
    checkpoint into ``checkpoint_dir`` (default ``log_dir/checkpoints``) at round ends, keeping
    the newest ``keep_checkpoints``; ``resume=True`` continues from the newest valid one (a
    restarted torchrun group does so by itself). ``nan``: "stop", "skip" or "rollback" (see
    unison.engine.guard). ``timeout``: seconds any collective may wait for a peer.

    Uneven workers: ``speeds=[1, 1, 0.5, 0.25]`` (one per worker) simulates them on one machine:
    worker r waits so that its steps take max(speeds)/speeds[r] times as long; the model is the
    same, only time changes, and records carry ``simulated_wait_s`` (unison.engine.pace).
    ``balance="speed"`` (with partition="shard") sizes each worker's share and batch by its
    throughput, measured each epoch (the declared ``speeds`` when given; unison.balance).
    ``on_failure="continue"``: a worker whose training step raises is dropped with a
    WorkerDropped warning (its share unused, its weight 0) and the run goes on with the others;
    on backend="processes" also one that dies or stalls past ``timeout``: the run is launched
    again without it, from the newest checkpoint (else from the start).
    """
    started = time.time()
    config = TrainConfig(
        strategy=strategy, workers=launch.get(backend).workers(workers), backend=backend, partition=partition, epochs=epochs, batch_size=batch_size,
        optimizer="custom" if callable(optimizer) else optimizer, lr=lr, momentum=momentum,
        nesterov=nesterov, weight_decay=weight_decay, schedule=schedule, penalty=penalty,
        constraint=constraint, loss="custom" if callable(loss) else loss, seed=seed, timeout=timeout,
        replicas_per_worker=replicas_per_worker, device=device, checkpoint_every=checkpoint_every,
        nan=nan, keep_checkpoints=keep_checkpoints, speeds=speeds, balance=balance, on_failure=on_failure,
        checkpoint_dir=str(checkpoint_dir) if isinstance(checkpoint_dir, Path) else checkpoint_dir)
    return run(config, model, data, val, optimizer=optimizer if callable(optimizer) else None,
               loss=loss if callable(loss) else None, progress=progress, log_dir=log_dir, resume=resume,
               started=started, label=label)


def run(config: TrainConfig, model: nn.Module | Callable[[], nn.Module], data: Any, val: Any = None, *,
        optimizer: Callable | None = None, loss: Callable | None = None, progress: bool = True,
        log_dir: str | Path | None = None, resume: bool = False, started: float | None = None,
        label: str | None = None) -> Result:
    """fit() for a TrainConfig: ``optimizer``/``loss`` are the callables it calls "custom".
    With on_failure="continue", a worker process that dies or stalls is dropped and the run
    launched again without it (unison.plan.Plan.relaunch)."""
    again: dict[str, Any] = {"resume": resume, "started": started}
    while True:
        plan = plans.resolve(config, model, data, val, optimizer=optimizer, loss=loss, log_dir=log_dir,
                             progress=progress, label=label, **again)
        try:
            return plan.finish(plan.launch())
        except WorkerError as exc:
            relaunch = plan.relaunch(exc)
            if relaunch is None:
                raise
            again = relaunch


def train(run_config: RunConfig, *, out: str | Path | None = None, resume: bool = False,
          overwrite: bool = False, progress: bool = True) -> tuple[Result, Path]:
    """`unison train`: one run of a run file, written to its run folder ``out`` (default
    runs/<date-time>-train), which appears only when the run succeeded. With checkpoints a
    failed run stays unfinished in ``.<out>.partial``; ``resume=True`` continues it. Under
    torchrun the same run file runs as one rank of the group (backend and workers follow torchrun).
    """
    size = torchrun_world_size()
    if size is not None and run_config.train.backend != "torchrun":
        run_config = from_dict(run_config.to_dict(), {"train.backend": "torchrun", "train.workers": size})
    cfg = run_config.train
    launcher = launch.get(cfg.backend)
    checkpointing = cfg.checkpoint_every is not None or cfg.checkpoint_dir is not None
    if checkpointing and size is not None and out is None and cfg.checkpoint_dir is None:
        raise ConfigError("checkpoints under torchrun need --out: every rank, and a restarted group, "
                          "must find the same run directory (the default name has the time in it)")
    out = Path(out) if out is not None else rundir.default_out("train")
    writer = launcher.is_writer()
    if launcher.restarted() and (checkpointing or not overwrite) and _published(out):
        # Every rank had finished and rank 0 had published the run before one rank failed.
        if writer:
            print(f"unison: run {out} was already complete (rank 0 published it before the failure); "
                  "nothing to do", file=sys.stderr)
        return _published_result(run_config, out), out
    # Train into a scratch folder; the run folder appears (or is replaced) only on success.
    scratch = rundir.training_dir(out, checkpointing=checkpointing, resume=resume, overwrite=overwrite,
                                  restarted=launcher.restarted(), writer=writer)
    if checkpointing and writer:  # written first: `--resume` reads it back
        scratch.mkdir(parents=True, exist_ok=True)
        (scratch / rundir.CONFIG_FILE).write_text(run_config.to_toml())
    plans.start_early(cfg)  # the workers' interpreter starts while the data is loaded
    data, model = _data_and_model(run_config)
    succeeded = False
    try:
        # checkpoints go to the scratch folder's checkpoints/ unless the run file names a folder
        result = run(cfg, model, data, progress=progress, resume=resume, log_dir=scratch)
        if writer:
            (scratch / rundir.CONFIG_FILE).write_text(run_config.to_toml())
            (scratch / "summary.txt").write_text(result.summary() + "\n")
            rundir.replace_dir(scratch, out)
        succeeded = True
    except WorkerError as exc:
        if exc.checkpoint:
            exc.args = (str(exc).replace(RESUME_HINT, f"`unison train --resume {out}` continues from it"),)
        raise
    finally:
        # The writer's folder; an unfinished run with checkpoints is kept for --resume.
        if writer and not (checkpointing and not succeeded):
            shutil.rmtree(scratch, ignore_errors=True)
    return result, out


def _data_and_model(run_config: RunConfig) -> tuple[Any, Callable[[], nn.Module]]:
    """A run file's training data, and its model as a factory (the plan builds it under the
    run's seed, so runs repeat): the MLP sized to the data, or the class_path's model."""
    data_config, model_config, cfg = run_config.data, run_config.model, run_config.train
    data = prepare(data_config.dataset, seed=cfg.seed, val_fraction=data_config.val_fraction, loss=cfg.loss,
                   label=data_config.label)

    return data, model_config.factory(data.features, data.outputs)


def _published(out: Path) -> bool:
    """Whether ``out`` holds a finished run (its model and history) and nothing is unfinished."""
    return all((out / name).is_file() for name in (MODEL_FILE, HISTORY_FILE)) and not rundir.partial_dir(out).exists()


def _published_result(run_config: RunConfig, out: Path) -> Result:
    """The Result of a run already written to ``out``: its model and history read back."""
    data, model = _data_and_model(run_config)
    built = model()
    built.load_state_dict(load_file(out / MODEL_FILE))
    history = read_jsonl(out / HISTORY_FILE)
    cfg = run_config.train
    wall_s = float(history[-1].get("wall_s", 0.0)) if history else 0.0
    return Result(model=built, history=history, config=cfg, workers=plans.world_size(cfg), startup_s=0.0,
                  wall_s=wall_s, data_name=data.name)
