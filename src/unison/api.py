"""fit(): validate everything → pick the backend → launch the workers → gather a Result."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import nn

from . import checkpoint as checkpoints
from .config import TrainConfig
from .data import CLASSIFICATION, TrainData, prepare
from .errors import ConfigError, DataError, WorkerError, expected
from .history import with_throughput, write_jsonl
from .launch import CAPABILITIES, CAPABILITY_REASONS
from .launch import torchrun as torchrun_backend
from .recovery import check_resumable
from .replica import Job, build_optimizer, resolve_loss


HISTORY_FILE, MODEL_FILE = "history.jsonl", "model.safetensors"
RESUME_HINT = "resume=True continues from it"


@dataclass
class Result:
    """What fit() returns: the merged model, the per-round history and how the run went."""

    model: nn.Module
    history: list[dict[str, Any]]
    config: TrainConfig
    workers: int
    startup_s: float   # fit() called -> first training step
    wall_s: float      # fit() called -> fit() returned
    data_name: str = "data"

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    def summary(self) -> str:
        """A table of the rounds (at most 12 rows shown) and a headline."""
        cfg = self.config
        lines = [f"unison: {cfg.strategy.spec()} on {self.data_name}, {self.workers} worker(s), "
                 f"backend={cfg.backend}, partition={cfg.partition.spec()}, "
                 f"{cfg.epochs} epoch(s), batch {cfg.batch_size}, {cfg.optimizer} lr={cfg.lr:g}"]
        columns = [("epoch", "{:>7.2f}"), ("step", "{:>6d}"), ("wall_s", "{:>7.2f}"),
                   ("train_loss", "{:>10.4f}"), ("val_loss", "{:>9.4f}"), ("val_acc", "{:>8.2%}"),
                   ("divergence", "{:>10.4f}"), ("comm_bytes", "{:>11,d}")]
        columns = [(name, fmt) for name, fmt in columns if any(name in r for r in self.history)]
        widths = [len(fmt.format(0 if "d}" in fmt else 0.0)) for _, fmt in columns]
        lines.append("  ".join(name.rjust(w) for (name, _), w in zip(columns, widths)))
        rows = self.history if len(self.history) <= 12 else self.history[:5] + [None] + self.history[-6:]
        for record in rows:
            if record is None:
                lines.append("  ".join("...".rjust(w) for w in widths))
                continue
            lines.append("  ".join(fmt.format(record[name]) if name in record else "-".rjust(w)
                                   for (name, fmt), w in zip(columns, widths)))
        final = self.final
        headline = f"done in {self.wall_s:.2f} s (start-up {self.startup_s:.2f} s)"
        if "val_acc" in final:
            headline += f"; final validation accuracy {final['val_acc']:.2%}"
        elif "val_loss" in final:
            headline += f"; final validation loss {final['val_loss']:.4g}"
        lines.append(headline)
        return "\n".join(lines)

    def save_model(self, path: str | Path) -> None:
        """The merged model's state_dict as safetensors (no pickle)."""
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(path))


def prestart() -> None:
    """Start the interpreter that worker processes are forked from (a forkserver importing torch
    and unison, ~1.5 s) now, in the background, and return at once. fit() on backend "processes"
    starts it anyway, but only its own data checks then overlap it: call this first thing, before
    loading data, and the workers start in a fraction of a second. It is kept for later runs."""
    from .launch import processes

    processes.prestart()


def fit(model: nn.Module | Callable[[], nn.Module], data: Any, val: Any = None, *,
        strategy: Any = "periodic", workers: int | None = None, backend: str = "processes",
        partition: Any = "shard", epochs: int = 5, batch_size: int = 64,
        optimizer: str | Callable = "sgd", lr: float = 0.01, momentum: float = 0.0,
        nesterov: bool = False, weight_decay: float = 0.0, schedule: Any = None,
        penalty: Any = None, constraint: Any = None, loss: str | Callable | None = None, seed: int = 0,
        progress: bool = True, log_dir: str | Path | None = None, timeout: float = 300.0,
        device: str = "cpu", replicas_per_worker: int = 1,
        checkpoint_every: int | str | None = None, checkpoint_dir: str | Path | None = None,
        keep_checkpoints: int = 2, nan: str = "stop", resume: bool = False) -> Result:
    """Train ``workers`` replicas of ``model`` on ``data`` with ``strategy`` and merge them.

    ``model``: an nn.Module (its weights are every replica's start) or a zero-argument factory
    (called under ``torch.manual_seed(seed)``). ``data``/``val``: (X, y) arrays or tensors, a
    torch Dataset, or a built-in name; ``val`` may also be a fraction to hold out.
    ``workers``: 2 by default, torchrun's WORLD_SIZE on backend="torchrun".
    ``schedule``: None, "cosine", "step(every=10, gamma=0.1)" or "warmup(100)" (unison.schedules);
    ``penalty``: "l2(λ)", "l1(λ)", "elastic(λ1, λ2)"; ``constraint``: "max_norm(c)",
    "unit_ball(r)", "non_negative" (unison.penalties).
    ``backend="stacked"``: the ``workers`` replicas train as one batched computation in this
    process, on ``device`` ("cpu", "cuda", "cuda:N"); ``replicas_per_worker=R`` makes each
    process of backend "processes" or "torchrun" hold R stacked replicas (unison.stacked).
    Everything is checked before any worker starts; problems raise unison.errors exceptions.

    Reliability: ``checkpoint_every`` (rounds, or a duration such as "10min") writes a
    checkpoint into ``checkpoint_dir`` (default ``log_dir/checkpoints``) at round ends, keeping
    the newest ``keep_checkpoints``; ``resume=True`` continues from the newest valid one (a
    restarted torchrun group does so by itself). ``nan``: "stop", "skip" or "rollback" (see
    unison.nonfinite). ``timeout``: seconds any collective may wait for a peer.
    """
    started = time.time()
    torchrun_size = torchrun_backend.world_size()
    if backend == "torchrun":
        if torchrun_size is None:
            raise ConfigError("backend='torchrun' needs torchrun's environment (RANK, WORLD_SIZE, "
                              "MASTER_ADDR, MASTER_PORT); start with `torchrun --nproc-per-node N ...` "
                              "or use backend='processes' or 'threads'")
        if workers not in (None, torchrun_size):
            raise ConfigError(expected("workers", workers, f"{torchrun_size} (torchrun's WORLD_SIZE) or None"))
        workers = torchrun_size
    if checkpoint_dir is None and checkpoint_every is not None and log_dir is not None:
        checkpoint_dir = Path(log_dir) / "checkpoints"
    if not isinstance(resume, bool):
        raise ConfigError(expected("resume", resume, "True or False"))
    # A group that torchrun restarted continues from its checkpoint by itself.
    resume = resume or (backend == "torchrun" and torchrun_backend.restart_count() > 0 and checkpoint_dir is not None)
    config = TrainConfig(
        strategy=strategy, workers=2 if workers is None else workers, backend=backend,
        partition=partition, epochs=epochs, batch_size=batch_size,
        optimizer="custom" if callable(optimizer) else optimizer, lr=lr, momentum=momentum,
        nesterov=nesterov, weight_decay=weight_decay, schedule=schedule, penalty=penalty,
        constraint=constraint, loss="custom" if callable(loss) else loss, seed=seed, timeout=timeout,
        replicas_per_worker=replicas_per_worker, device=device,
        checkpoint_every=checkpoint_every, nan=nan, keep_checkpoints=keep_checkpoints,
        checkpoint_dir=str(checkpoint_dir) if isinstance(checkpoint_dir, Path) else checkpoint_dir)
    if config.checkpoint_every is not None and config.checkpoint_dir is None:
        raise ConfigError(f"checkpoint_every={config.checkpoint_every!r} needs checkpoint_dir (or log_dir, "
                          "whose checkpoints/ is then used)")
    missing = config.strategy.needs - CAPABILITIES[backend]
    if missing:
        why = "; ".join(f"{need}: {CAPABILITY_REASONS.get((need, backend), need)}" for need in sorted(missing))
        raise ConfigError(f"strategy {config.strategy.spec()!r} cannot run on backend {backend!r} ({why}); "
                          "use backend='processes' or 'threads' on one machine, or on a cluster a strategy "
                          "that communicates: sync, periodic or diloco")
    world_size = config.strategy.world_size(config.workers)
    if backend == "torchrun" and world_size != torchrun_size:
        raise ConfigError(f"strategy {config.strategy.spec()!r} runs {world_size} worker(s) but torchrun "
                          f"started {torchrun_size}; use --nproc-per-node {world_size}")
    if backend == "processes" and world_size > 1:
        # The workers' interpreter starts now, while the data is prepared. Not for one worker: it
        # trains in this process, and a forkserver importing torch would only take a core from it.
        prestart()
    # Partitions and merges count replicas: a worker holds replicas_per_worker of them (stacked).
    replicas = world_size * config.replicas_per_worker

    # Only rank 0 writes the log; an earlier run's files there are never overwritten.
    rank0 = backend != "torchrun" or torchrun_backend.is_rank0()
    log_path = Path(log_dir) if log_dir is not None and rank0 else None
    if log_path is not None and not resume and any((log_path / name).exists() for name in (HISTORY_FILE, MODEL_FILE)):
        raise ConfigError(f"log_dir={str(log_path)!r} already holds a run ({HISTORY_FILE} or {MODEL_FILE}); "
                          "choose another directory")

    if config.optimizer == "custom" and not callable(optimizer):
        build_optimizer([], config, None)  # raises: 'custom' names a callable that was not given
    if config.loss == "custom" and not callable(loss):
        resolve_loss(loss, CLASSIFICATION)  # raises: 'custom' names a callable that was not given
    train = prepare(data, val, seed=seed, loss=loss if isinstance(loss, str) else None)
    if replicas > len(train.x):
        raise ConfigError(expected("workers", replicas, f"at most the {len(train.x)} training samples"))
    # A label-aware partition (dirichlet) draws its shares from the training labels here, once.
    config = dataclasses.replace(config, partition=config.partition.bind(train.y, replicas, seed))
    config.partition.check(len(train.x), replicas)
    shares = config.partition.sizes(len(train.x), replicas)
    config.strategy.check(replicas, has_validation=train.x_val is not None,
                          steps=[math.ceil(share / batch_size) for share in shares])
    start_model = _start_model(model, seed)
    _check_model(start_model, train, loss)
    _check_batchnorm(start_model, config.partition.sizes(len(train.x), replicas), batch_size)
    # A custom optimizer factory is tried once here, so that its errors come before any worker.
    if backend == "stacked" or config.replicas_per_worker > 1:  # and can the model be vmapped?
        from .launch import stacked as stacked_backend
        stacked_backend.check(config, start_model, train, optimizer if callable(optimizer) else None,
                              loss if callable(loss) else None)
    elif callable(optimizer) or config.checkpoint_dir is not None:
        # (a named optimizer is fully checked by TrainConfig; building one here without need would
        # cost the caller torch's lazy import of torch._dynamo, ~0.7 s)
        probe = build_optimizer(copy.deepcopy(start_model).parameters(), config,
                                optimizer if callable(optimizer) else None)
        if config.checkpoint_dir is not None:  # its settings must fit in JSON: fail now, not mid-run
            checkpoints.flatten_optimizer(probe.state_dict(), "")
    resume_from = _resume_point(config, resume, train, start_model, world_size, rank0)

    if log_path is not None:
        log_path.mkdir(parents=True, exist_ok=True)
        write_jsonl(log_path / HISTORY_FILE, resume_from.state["history"] if resume_from else [])
    job = Job(config=config, data=train, model=start_model,
              optimizer=optimizer if callable(optimizer) else None, loss=loss if callable(loss) else None,
              started=started, progress=progress, history_path=str(log_path / HISTORY_FILE) if log_path else None,
              resume=resume_from)
    try:
        outcome = _launcher(backend)(job, world_size)
    except WorkerError as exc:
        _name_checkpoint(exc, config.checkpoint_dir)
        raise

    merged = copy.deepcopy(start_model)
    merged.load_state_dict(outcome.state)
    result = Result(model=merged, history=with_throughput(outcome.history, outcome.startup_s),
                    config=config, workers=world_size,
                    startup_s=outcome.startup_s, wall_s=time.time() - started, data_name=train.name)
    if log_path is not None:
        write_jsonl(log_path / HISTORY_FILE, result.history)
        result.save_model(log_path / MODEL_FILE)
    return result


def _resume_point(config: TrainConfig, resume: bool, data: TrainData, model: nn.Module,
                  world_size: int, rank0: bool) -> checkpoints.Checkpoint | None:
    """The checkpoint to continue from, verified and checked against this run; or None.
    Every rank reads it (a shared filesystem across machines); only rank 0, the writer,
    refuses a fresh run into a directory with checkpoints (the others would race with it)."""
    directory = config.checkpoint_dir
    if directory is None:
        if resume:
            raise ConfigError("resume=True needs checkpoint_dir (the directory holding the run's checkpoints)")
        return None
    if not resume:
        if rank0 and checkpoints.steps_on_disk(directory):
            raise ConfigError(f"checkpoint_dir={directory!r} already holds checkpoints of a run; pass "
                              "resume=True to continue it, or choose another directory")
        return None
    found = checkpoints.load_latest(directory)  # warns about a corrupt newer one it skips
    if found is None:
        warnings.warn(f"resume: no checkpoint in {directory!r} yet; starting from the beginning",
                      checkpoints.CheckpointWarning, stacklevel=3)
        return None
    check_resumable(found, config, data, model, world_size)
    return found


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


def _launcher(backend: str):
    if backend == "threads":
        from .launch.threads import launch
    elif backend == "processes":
        from .launch.processes import launch
    elif backend == "stacked":
        from .launch.stacked import launch
    else:
        launch = torchrun_backend.launch
    return launch


def _start_model(model: Any, seed: int) -> nn.Module:
    """The replicas' common start, on CPU; the caller's module is never modified."""
    if isinstance(model, nn.Module):
        return copy.deepcopy(model).cpu()
    if callable(model):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            built = model()
        if not isinstance(built, nn.Module):
            raise ConfigError(expected("model", f"a factory returning {type(built).__name__}",
                                       "an nn.Module or a zero-argument callable returning one"))
        return built.cpu()
    raise ConfigError(expected("model", type(model).__name__, "an nn.Module or a zero-argument callable returning one"))


def _check_batchnorm(model: nn.Module, shares: list[int], batch_size: int) -> None:
    """BatchNorm cannot train on a batch of one sample; find such a batch before starting."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    for rank, share in enumerate(shares):
        if batch_size == 1 or share % batch_size == 1:
            raise ConfigError(f"batch_size={batch_size} leaves worker {rank} (share of {share} samples) "
                              "a batch of 1 sample, which BatchNorm cannot train on; choose another "
                              "batch_size or number of workers")


def _check_model(model: nn.Module, data: TrainData, loss: Any) -> None:
    """Run the model on two samples: its output must fit the targets."""
    if not any(True for _ in model.parameters()):
        raise ConfigError("model has no parameters to train")
    probe = copy.deepcopy(model).eval()
    try:
        with torch.no_grad():
            out = probe(data.x[:2])
    except Exception as exc:  # noqa: BLE001 - any failure here is a mismatch with the data
        raise DataError(f"model cannot run on the data (input shape {tuple(data.x.shape[1:])}): "
                        f"{type(exc).__name__}: {exc}") from None
    if callable(loss):
        return
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"model returns {type(out).__name__}; expected a tensor of outputs")
    if data.task == CLASSIFICATION:
        if out.dim() != 2 or out.shape[1] < data.num_classes:
            raise ConfigError(expected("model output shape", tuple(out.shape[1:]),
                                       f"({data.num_classes},) or wider: one logit per class for "
                                       f"{data.num_classes} classes"))
    elif out[0].numel() != max(1, math.prod(data.y.shape[1:])):
        raise ConfigError(expected("model output shape", tuple(out.shape[1:]), f"{tuple(data.y.shape[1:]) or (1,)} "
                                   "to match the regression targets"))
