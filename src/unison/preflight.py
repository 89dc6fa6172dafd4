"""The pre-flight checks of a run (unison.plan.resolve calls them): what a backend, stacked
replicas or an asynchronous strategy cannot do, the declared speeds, and probes of the model, the
loss and BatchNorm on the data — each a ConfigError naming the field before any worker starts."""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
from torch import nn

from . import launch
from .config import TrainConfig
from .data import CLASSIFICATION, TrainData
from .errors import ConfigError, DataError, UnisonError, expected
from .launch.base import Backend
from .partitions import Shard


def check_backend(config: TrainConfig, backend: Backend, size: int) -> None:
    """The strategy's needs, the worker count under torchrun, and the device."""
    why = backend.why_not(config.strategy.needs)
    if why:
        raise ConfigError(f"strategy {config.strategy.spec()!r} cannot run on backend {backend.name!r} ({why}); "
                          "use backend='processes' or 'threads' on one machine, or on a cluster a strategy "
                          "that communicates: sync, periodic or diloco")
    if not backend.in_process:
        started = backend.workers(config.workers)
        if size != started:
            raise ConfigError(f"strategy {config.strategy.spec()!r} runs {size} worker(s) but {backend.name} "
                              f"started {started}; use --nproc-per-node {size}")
    if config.device.split(":")[0] not in backend.devices:
        able = [b.name for b in launch.REGISTRY.values() if "cuda" in b.devices]
        raise ConfigError(f"device={config.device!r} applies to backend={' or '.join(map(repr, able))}; "
                          "threads and processes train on the CPU, and torchrun puts each rank on "
                          "cuda:LOCAL_RANK by itself")


def check_stacking(config: TrainConfig, stacked: bool) -> None:
    """replicas_per_worker, and what stacked replicas cannot do yet (unison.engine.stacked)."""
    per_worker = config.replicas_per_worker
    if per_worker > 1:
        able = [b.name for b in launch.REGISTRY.values() if b.stacks_per_worker]
        if not launch.get(config.backend).stacks_per_worker:
            raise ConfigError(f"replicas_per_worker={per_worker} applies to backend="
                              f"{' or '.join(map(repr, able))} (each worker process holds that many stacked "
                              f"replicas); with backend={config.backend!r} use replicas_per_worker=1 (on "
                              "'stacked', workers= is the number of stacked replicas)")
        if config.strategy.shares_model:
            raise ConfigError(f"strategy {config.strategy.spec()!r} cannot run with replicas_per_worker="
                              f"{per_worker}: its workers must all update one shared model, and stacked "
                              "replicas are separate copies; use replicas_per_worker=1")
        if config.strategy.world_size(per_worker) == 1:
            raise ConfigError(f"strategy {config.strategy.spec()!r} trains one replica; replicas_per_worker="
                              f"{per_worker} needs a strategy with several (sync, periodic, ...)")
    merge = getattr(config.strategy, "merge", None)
    if config.on_failure == "continue" and merge is not None and merge.name != "mean":
        raise ConfigError(f"on_failure='continue' needs merge='mean' ({config.strategy.spec()!r} has "
                          f"merge={merge.spec()!r}): a dropped worker weighs 0 in a mean, but under a robust rule it "
                          "would still vote, with a zero gradient or a stale model; use merge='mean' or "
                          "on_failure='stop'")
    if stacked and config.on_failure == "continue":
        raise ConfigError("on_failure='continue' drops the one worker whose step failed, and stacked replicas "
                          "(backend='stacked' or replicas_per_worker > 1) step as one computation; use "
                          "backend='threads', 'processes' or 'torchrun' with one replica each, or on_failure='stop'")
    if stacked and config.strategy.partial_rounds:
        raise ConfigError(f"strategy {config.strategy.spec()!r} closes rounds without its stragglers, and "
                          "stacked replicas (backend='stacked' or replicas_per_worker > 1) step as one "
                          "computation; use backend='threads', 'processes' or 'torchrun' with one replica each")
    if stacked and (config.checkpoint_every is not None or config.checkpoint_dir is not None
                    or config.nan == "rollback"):
        raise ConfigError("checkpoint_every and nan='rollback' are not supported with stacked replicas "
                          "(backend='stacked' or replicas_per_worker > 1) yet: their per-replica optimizer "
                          "state is not saved; use backend='threads' or 'processes' with one replica each")


def check_asynchronous(config: TrainConfig, size: int) -> None:
    """What an asynchronous strategy (unison.engine.asynchronous) cannot do yet: its ranks never
    agree on a step, so nan='skip'/'rollback' and checkpoints (both made at common points) are out."""
    strategy = config.strategy
    if not strategy.asynchronous:
        return
    if size <= strategy.servers:
        raise ConfigError(f"strategy {strategy.spec()!r} needs {strategy.servers} server rank(s) and at least one "
                          f"worker; torchrun started {size} process(es): use --nproc-per-node {strategy.servers + 1} "
                          "or more")
    if config.replicas_per_worker > 1:
        raise ConfigError(f"replicas_per_worker={config.replicas_per_worker} is not supported with the asynchronous "
                          f"strategy {strategy.name!r} (stacked replicas step together); use replicas_per_worker=1")
    if config.nan != "stop":
        raise ConfigError(f"nan={config.nan!r} is not supported with the asynchronous strategy {strategy.name!r} "
                          "(its workers never step together); use nan='stop'")
    if config.balance != "none" or config.on_failure != "stop":
        field, value = ("balance", config.balance) if config.balance != "none" else ("on_failure", config.on_failure)
        raise ConfigError(f"{field}={value!r} is not supported with the asynchronous strategy {strategy.name!r} "
                          f"yet (its workers neither share epochs nor rounds); use "
                          f"{'balance=' + repr('none') if field == 'balance' else 'on_failure=' + repr('stop')}")
    if config.speeds is not None and len(config.speeds) != size - strategy.servers:
        raise ConfigError(expected("speeds", list(config.speeds), f"one number per training worker: "
                                   f"{size - strategy.servers} (strategy {strategy.spec()!r} runs "
                                   f"{strategy.servers} server rank(s) besides them)"))
    if config.checkpoint_every is not None or config.checkpoint_dir is not None:
        raise ConfigError(f"checkpoint_every/checkpoint_dir are not supported with the asynchronous strategy "
                          f"{strategy.name!r} yet (its workers have no common round end to save at); "
                          "leave them unset")


def check_speeds(config: TrainConfig, stacked: bool, replicas: int) -> None:
    """speeds: one per worker, and workers that each run on their own (a wait per worker);
    balance="speed": shard's shares re-sized, from rates that a resume can find again."""
    if config.balance == "speed":
        if not isinstance(config.partition, Shard):
            raise ConfigError(f"balance='speed' re-sizes the shares of partition='shard' by worker speed; "
                              f"partition={config.partition.spec()!r} has shares of its own; use "
                              "partition='shard' or balance='none'")
        if stacked:
            raise ConfigError("balance='speed' sizes each worker's share by its own throughput, and stacked "
                              "replicas (backend='stacked' or replicas_per_worker > 1) train as one computation; "
                              "use backend='threads', 'processes' or 'torchrun' with one replica each")
        if config.speeds is None and (config.checkpoint_every is not None or config.checkpoint_dir is not None):
            raise ConfigError("balance='speed' with checkpoints needs speeds= (declared rates): measured rates "
                              "are not saved in checkpoints yet, so a resumed epoch could not be re-dealt alike")
    if config.speeds is None:
        return
    if stacked:
        raise ConfigError("speeds= simulates uneven workers by making each worker wait, and stacked "
                          "replicas (backend='stacked' or replicas_per_worker > 1) train as one computation; "
                          "use backend='threads', 'processes' or 'torchrun' with one replica each")
    if len(config.speeds) not in (replicas, config.workers):
        raise ConfigError(expected("speeds", list(config.speeds), f"one number per worker: {config.workers} "
                                   f"(workers={config.workers}; strategy {config.strategy.spec()!r} runs {replicas})"))


def declared_speeds(config: TrainConfig, replicas: int) -> tuple[float, ...] | None:
    """The declared speeds of the replicas that run, over the fastest declared (so each is <= 1):
    a strategy that runs fewer replicas than workers were asked for (single) runs on the first."""
    if config.speeds is None:
        return None
    return tuple(speed / max(config.speeds) for speed in config.speeds[:replicas])


def called(what: str, function: Callable, *args: Any, given: Any = None) -> Any:
    """``function(*args)``, which calls ``given`` (default: ``function``), a callable the user
    gave; what it raises becomes a ConfigError naming it, before any worker starts (the same
    call would fail in every worker)."""
    try:
        return function(*args)
    except UnisonError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code: any exception is its failure
        given = function if given is None else given
        name = getattr(given, "__qualname__", type(given).__name__)
        raise ConfigError(f"the {what} {name!r} raised {type(exc).__name__}: {exc}") from exc


def check_batchnorm(model: nn.Module, shares: list[int], batches: list[int]) -> None:
    """BatchNorm cannot train on a batch of one sample; find such a batch before starting."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    for rank, (share, batch_size) in enumerate(zip(shares, batches)):
        if batch_size == 1 or share % batch_size == 1:
            raise ConfigError(f"batch_size={batch_size} leaves worker {rank} (share of {share} samples) "
                              "a batch of 1 sample, which BatchNorm cannot train on; choose another "
                              "batch_size or number of workers")


def check_model(model: nn.Module, data: TrainData, loss: Any) -> None:
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
        called("loss callable", loss, out, data.y[:2])
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
