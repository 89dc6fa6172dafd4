"""resolve(): a run decided once, on the driver, into a Plan.

Everything derived from the settings has its home here: the backend and its rules, the world
size and the replicas, the checkpoint folder and schedule, the log folder, the resume point,
whether to start the workers' interpreter early, and every cross-field rule and pre-flight probe
(unison.preflight: the backend's rules, the model on two samples, BatchNorm's batches; here the
optimizer and vmap). Nothing downstream
re-derives a fact the plan holds: the Job it builds carries each setting to where it is used.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import checkpoint as checkpoints
from . import launch, preflight
from .config import TrainConfig
from .data import CLASSIFICATION, TrainData, prepare
from .engine.checkpointer import data_fingerprint
from .engine.job import CheckpointSettings, Job, OptimizerSettings, Outcome
from .engine.replica import resolve_loss
from .engine.stacked import check_vmappable
from .errors import CheckpointError, ConfigError, WorkerDropped, WorkerError, expected
from .history import with_throughput, write_jsonl
from .launch.base import Backend
from .balance import balanced_sizes
from .result import Result

HISTORY_FILE, MODEL_FILE = "history.jsonl", "model.safetensors"
RESUME_HINT = "resume=True continues from it"
# Settings a resumed run may change; any other difference is refused (the result would not be
# the run that was checkpointed).
RESUMABLE_CHANGES = ("backend", "epochs", "timeout", "checkpoint_every", "checkpoint_dir", "keep_checkpoints", "nan",
                     "on_failure")


@dataclass
class Plan:
    """A run, decided: launch it with ``launch()``, turn its outcome into a Result with ``finish``."""

    config: TrainConfig
    backend: Backend
    world_size: int          # the workers, as the user counts them (single: 1; stacked: its replicas)
    replicas: int            # replicas in all: what partitions and merges count
    job: Job
    log_dir: Path | None     # this process writes the run's log there (None: not the writer)
    locked: str | None = None  # the checkpoint folder this process holds the lock of, until launch() ends

    def launch(self) -> Outcome:
        try:
            return self.backend.launch(self.job)
        except WorkerError as exc:
            if not self.relaunches(exc):
                _name_checkpoint(exc, self.job.checkpoint.directory if self.job.checkpoint else None)
            raise
        finally:
            if self.locked is not None:
                checkpoints.unlock(self.locked)

    def relaunches(self, error: WorkerError) -> bool:
        """Whether on_failure="continue" goes on without the worker this error names: it died or
        stalled (not raised), others are left, and the backend can start its workers anew."""
        job = self.job
        history = job.resume.state["history"] if job.resume is not None else []
        dropped = set(job.lost) | set(history[-1].get("failed_workers", ()) if history else ())
        return (job.on_failure == "continue" and self.backend.recovers_lost and error.lost
                and error.rank is not None and error.rank not in dropped and len(dropped) + 1 < job.workers)

    def relaunch(self, error: WorkerError) -> dict[str, Any] | None:
        """What resolve() needs to run again without the worker that died or stalled (``lost``,
        and ``resume`` from the newest checkpoint, else from the start), after a WorkerDropped
        warning; None where ``relaunches`` says no."""
        job = self.job
        if not self.relaunches(error):
            return None
        newest = checkpoints.latest_valid_path(job.checkpoint.directory if job.checkpoint else None)
        start = (f"from its checkpoint {str(newest)!r}" if newest is not None else
                 "from the start (no checkpoint yet)" if job.checkpoint else
                 "from the start (set checkpoint_every to lose less)")
        warnings.warn(f"{error}; on_failure='continue': worker {error.rank} is dropped and the run goes on "
                      f"without it {start}", WorkerDropped, stacklevel=4)
        # Records count wall time from fit()'s start: a relaunch keeps the offset its first launch had.
        offset = job.wall_offset
        if offset is None:
            history = job.resume.state["history"] if job.resume is not None else []
            offset = float(history[-1]["wall_s"]) if history else 0.0
        return {"lost": (*job.lost, error.rank), "resume": newest is not None, "started": job.started,
                "wall_offset": offset}

    def finish(self, outcome: Outcome) -> Result:
        merged = copy.deepcopy(self.job.model)
        merged.load_state_dict(outcome.state)
        result = Result(model=merged, history=with_throughput(outcome.history, outcome.startup_s),
                        config=self.config, workers=self.world_size - self.config.strategy.servers,
                        startup_s=outcome.startup_s,
                        wall_s=time.time() - self.job.started, data_name=self.job.data.name)
        if self.log_dir is not None:
            write_jsonl(self.log_dir / HISTORY_FILE, result.history)
            result.save_model(self.log_dir / MODEL_FILE)
        return result


def world_size(config: TrainConfig) -> int:
    """How many workers a run has: its strategy decides, given the workers asked for; under
    torchrun, whose processes exist already, a strategy's servers are among them."""
    if config.strategy.servers and not launch.get(config.backend).in_process:
        return config.workers
    return config.strategy.world_size(config.workers)


def start_early(config: TrainConfig) -> None:
    """Start what this run's workers need (the processes backend's forkserver) in the background,
    so that it overlaps the caller's data preparation."""
    launch.get(config.backend).prestart(world_size(config))


def resolve(config: TrainConfig, model: nn.Module | Callable[[], nn.Module], data: Any, val: Any = None, *,
            optimizer: Callable | None = None, loss: Callable | None = None, log_dir: str | Path | None = None,
            resume: bool = False, progress: bool = True, started: float | None = None,
            label: str | None = None, lost: tuple[int, ...] = (), wall_offset: float | None = None) -> Plan:
    """The Plan of one run; raises unison.errors exceptions for anything that cannot work,
    before any worker starts. ``optimizer``/``loss``: the callables a config calls "custom";
    ``label``: a CSV file's label column (unison.data.prepare); ``lost``, ``wall_offset``: what a
    relaunch carries (``Plan.relaunch``)."""
    started = time.time() if started is None else started
    if not isinstance(resume, bool):
        raise ConfigError(expected("resume", resume, "True or False"))
    backend = launch.get(config.backend)
    size = world_size(config)
    preflight.check_backend(config, backend, size)
    stacked = backend.stacks_all or config.replicas_per_worker > 1
    replicas_per_worker = size if backend.stacks_all else config.replicas_per_worker
    replicas = (size - config.strategy.servers) * config.replicas_per_worker  # servers train none
    preflight.check_stacking(config, stacked)
    preflight.check_asynchronous(config, size)
    preflight.check_speeds(config, stacked, replicas)
    checkpoint_dir = config.checkpoint_dir
    if checkpoint_dir is None and config.checkpoint_every is not None and log_dir is not None:
        checkpoint_dir = str(Path(log_dir) / "checkpoints")
    if config.checkpoint_every is not None and checkpoint_dir is None:
        raise ConfigError(f"checkpoint_every={config.checkpoint_every!r} needs checkpoint_dir (or log_dir, "
                          "whose checkpoints/ is then used)")
    # A group that its launcher restarted continues from its checkpoint by itself.
    resume = resume or (backend.restarted() and checkpoint_dir is not None)
    backend.prestart(size)  # the workers' interpreter starts now, while the data is prepared

    # Only one process writes the log; an earlier run's files there are never overwritten.
    writer = backend.is_writer()
    log_path = Path(log_dir) if log_dir is not None and writer else None
    if log_path is not None and not resume and not lost and any((log_path / name).exists() for name in (HISTORY_FILE, MODEL_FILE)):
        raise ConfigError(f"log_dir={str(log_path)!r} already holds a run ({HISTORY_FILE} or {MODEL_FILE}); "
                          "choose another directory")
    optimizer_settings = OptimizerSettings(config.optimizer, config.lr, config.momentum, config.nesterov,
                                           config.weight_decay, optimizer)
    if config.optimizer == "custom" and optimizer is None:
        optimizer_settings.build([])  # raises: 'custom' names a callable that was not given
    if config.loss == "custom" and loss is None:
        resolve_loss("custom", CLASSIFICATION)  # raises likewise
    train = prepare(data, val, seed=config.seed, loss=None if config.loss == "custom" else config.loss, label=label)
    if replicas > len(train.x):
        raise ConfigError(expected("workers", replicas, f"at most the {len(train.x)} training samples"))
    # A label-aware partition (dirichlet) draws its shares from the training labels here, once.
    partition = config.partition.bind(train.y, replicas, config.seed)
    partition.check(len(train.x), replicas)
    shares = partition.sizes(len(train.x), replicas)
    config.strategy.check(replicas, has_validation=train.x_val is not None,
                          steps=[math.ceil(share / config.batch_size) for share in shares])
    config.strategy.check_schedule(config.epochs, [math.ceil(share / config.batch_size) for share in shares])
    start_model = _start_model(model, config.seed)
    preflight.check_model(start_model, train, loss)
    batches = [config.batch_size] * len(shares)
    if config.balance == "speed" and config.speeds is not None:  # the shares and batches it will deal
        shares, batches = balanced_sizes(len(train.x), replicas, config.batch_size,
                                         preflight.declared_speeds(config, replicas))
    preflight.check_batchnorm(start_model, shares, batches)

    settings = None
    if checkpoint_dir is not None:
        kind, every = config.checkpoint_schedule
        settings = CheckpointSettings(directory=checkpoint_dir, kind=kind, every=every,
                                      keep=config.keep_checkpoints, record=config.record())
    job = Job(strategy=config.strategy, partition=partition, workers=1 if backend.stacks_all else size,
              replicas_per_worker=replicas_per_worker, stacked=stacked, epochs=config.epochs,
              batch_size=config.batch_size, seed=config.seed, timeout=config.timeout,
              optimizer=optimizer_settings, loss_fn=loss or resolve_loss(config.loss, train.task), data=train,
              model=start_model, penalty=config.penalty, constraint=config.constraint,
              schedule=config.schedule, nan=config.nan, device=config.device, checkpoint=settings,
              started=started, progress=progress, speeds=preflight.declared_speeds(config, replicas),
              balance=config.balance, on_failure=config.on_failure, lost=tuple(lost), wall_offset=wall_offset,
              history_path=str(log_path / HISTORY_FILE) if log_path is not None else None)
    backend.check(job)
    if stacked:  # can the model be vmapped? (a custom optimizer factory is tried there too)
        check_vmappable(job)
    elif optimizer is not None or settings is not None:
        # A custom optimizer factory is tried once here, so that its errors come before any
        # worker. (A named optimizer is fully checked by TrainConfig; building one without need
        # would cost the caller torch's lazy import of torch._dynamo, ~0.7 s.)
        probe = preflight.called("optimizer factory", optimizer_settings.build, copy.deepcopy(start_model).parameters(),
                        given=optimizer)
        if settings is not None:  # its settings must fit in JSON: fail now, not mid-run
            checkpoints.flatten_optimizer(probe.state_dict(), "")
    # One writer per checkpoint folder, claimed before its checkpoints are read (and released
    # by launch()): a second run there would prune the first one's checkpoints, and the first the second's.
    locked = checkpoint_dir if settings is not None and writer else None
    if locked is not None:
        checkpoints.lock(locked)
    try:
        job.resume = _resume_point(config, checkpoint_dir, resume, train, start_model, replicas, writer)
        if log_path is not None:
            log_path.mkdir(parents=True, exist_ok=True)
            write_jsonl(log_path / HISTORY_FILE, job.resume.state["history"] if job.resume else [])
    except BaseException:
        if locked is not None:
            checkpoints.unlock(locked)
        raise
    resolved = copy.copy(config)  # the settings as run: the partition bound to the labels (no re-validation)
    object.__setattr__(resolved, "partition", partition)
    return Plan(config=resolved, backend=backend, world_size=size, replicas=replicas, job=job, log_dir=log_path,
                locked=locked)


def _resume_point(config: TrainConfig, directory: str | None, resume: bool, data: TrainData, model: nn.Module,
                  replicas: int, writer: bool) -> checkpoints.Checkpoint | None:
    """The checkpoint to continue from, verified and checked against this run; or None.
    Every rank reads it (a shared filesystem across machines); only the writer refuses a fresh
    run into a directory with checkpoints (the others would race with it)."""
    if directory is None:
        if resume:
            raise ConfigError("resume=True needs checkpoint_dir (the directory holding the run's checkpoints)")
        return None
    if not resume:
        if writer and checkpoints.steps_on_disk(directory):
            raise ConfigError(f"checkpoint_dir={directory!r} already holds checkpoints of a run; pass "
                              "resume=True to continue it, or choose another directory")
        return None
    found = checkpoints.load_latest(directory)  # warns about a corrupt newer one it skips
    if found is None:
        warnings.warn(f"resume: no checkpoint in {directory!r} yet; starting from the beginning",
                      checkpoints.CheckpointWarning, stacklevel=4)
        return None
    check_resumable(found, config, data, model, replicas)
    return found


def check_resumable(checkpoint: checkpoints.Checkpoint, config: TrainConfig, data: TrainData,
                    model: nn.Module, world_size: int) -> None:
    """Refuse, before any worker starts, a checkpoint written by a different run."""
    where = f"checkpoint {str(checkpoint.path)!r}"
    state = checkpoint.state
    if state.get("world_size") != world_size:
        raise CheckpointError(f"{where} has {state.get('world_size')} replicas; this run has {world_size}")
    saved, now = state.get("config", {}), config.record()
    changed = [k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if changed:
        raise CheckpointError(f"{where} was written with other settings: "
                              + ", ".join(f"{k}={saved.get(k)!r} there, {now[k]!r} now" for k in changed)
                              + f"; only {', '.join(RESUMABLE_CHANGES)} may change on resume")
    if state.get("data") != data_fingerprint(data):
        raise CheckpointError(f"{where} was written for other training data (SHA-256 differs)")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in checkpoint.model.items()}
    if shapes != found:
        diff = sorted(set(shapes.items()) ^ set(found.items()))[:3]
        raise CheckpointError(f"{where} holds a different model (first differences: {diff})")
    if state.get("step", 0) > config.epochs * state.get("steps_per_epoch", 0):
        raise CheckpointError(f"{where} is at step {state['step']}, beyond epochs={config.epochs}")


def _name_checkpoint(exc: WorkerError, directory: str | None) -> None:
    """Add the checkpoint to resume from to a failed run's error (same exception, longer message)."""
    path = checkpoints.latest_valid_path(directory)
    if path is not None:
        exc.checkpoint = str(path)
        hint = f"last checkpoint: {path} ({RESUME_HINT})"
    elif directory is not None:
        hint = f"no checkpoint was written to {directory} before the failure"
    else:
        hint = "no checkpoint to resume from (set checkpoint_every= and checkpoint_dir= to write them)"
    exc.args = (f"{exc.args[0] if exc.args else exc}; {hint}",) + tuple(exc.args[1:])


def _start_model(model: Any, seed: int) -> nn.Module:
    """The replicas' common start, on CPU; the caller's module is never modified."""
    if isinstance(model, nn.Module):
        return copy.deepcopy(model).cpu()
    if callable(model):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            built = preflight.called("model factory", model)
        if not isinstance(built, nn.Module):
            raise ConfigError(expected("model", f"a factory returning {type(built).__name__}",
                                       "an nn.Module or a zero-argument callable returning one"))
        return built.cpu()
    raise ConfigError(expected("model", type(model).__name__, "an nn.Module or a zero-argument callable returning one"))
