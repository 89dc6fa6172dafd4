"""Backend "stacked": every replica in this process, trained as one batched computation.

``workers=N`` replicas become the rows of stacked tensors (unison.stacked) on the CPU or on one
CUDA device; their collectives are reductions over the replica dimension (comm/stacked.py), so
nothing is communicated. The same pieces run hierarchically: with ``replicas_per_worker=R``
each process of the ``processes`` or ``torchrun`` backend holds R stacked replicas
(``run_stacked``), and the communicator adds one collective across the processes.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..comm.base import Communicator, Solo
from ..comm.stacked import StackedComm
from ..config import TrainConfig
from ..data import TrainData
from ..errors import ConfigError
from ..replica import Job, Outcome, resolve_loss, run
from ..stacked import StackedReplica
from . import cpu_cores


def launch(job: Job, world_size: int) -> Outcome:
    """Train ``world_size`` stacked replicas here, on ``job.config.device``, with every core."""
    device = torch.device(job.config.device)
    previous = torch.get_num_threads()
    torch.set_num_threads(cpu_cores())  # one computation, not N competing ones
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(job.config.seed)
            return run_stacked(job, Solo(), world_size, device)
    finally:
        torch.set_num_threads(previous)


def run_stacked(job: Job, comm: Communicator, replicas: int, device: torch.device | None = None) -> Outcome:
    """This worker's ``replicas`` stacked replicas through the one training loop; ``comm``
    links this worker to the others (Solo when it is the only one)."""
    return run(job, StackedComm(replicas, comm), device, build=StackedReplica.build)


def check(config: TrainConfig, model: torch.nn.Module, data: TrainData, optimizer: Callable | None,
          loss: Callable | None) -> None:
    """Refuse, before anything starts, a device that is not there and a model (or loss) that
    cannot run vmapped: two stacked replicas take one training step on two samples each."""
    device = torch.device(config.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={config.device!r} needs a CUDA device, and torch.cuda.is_available() "
                              "is False here; use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={config.device!r} is not there: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    probe = StackedReplica(model, 2, resolve_loss(loss, data.task), torch.device("cpu"), config, optimizer)
    where = _track_modules(probe._module)
    samples = torch.arange(min(2, len(data.x)))
    try:
        probe.gradients(data.x, data.y, [samples, samples])
        where.clear()  # a failure from here on is not in a module's forward
        probe.step = 1  # the first step, as the loop counts it (schedules read step - 1)
        probe.optimizer_step(1, 1, shared=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means the model cannot be stacked
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        place = f" in module {where[-1][0]!r} ({where[-1][1]})" if where else ""
        raise ConfigError(f"backend='stacked' cannot train this model as one vmapped computation{place}: "
                          f"{type(exc).__name__}: {first_line[:300]}; use backend='threads' or 'processes'"
                          ) from None


def _track_modules(module: torch.nn.Module) -> list[tuple[str, str]]:
    """A list that holds, while ``module`` runs, the (name, class) of the submodules entered
    and not yet left: after a failure its last entry is where the failure happened."""
    stack: list[tuple[str, str]] = []

    def leave(*_) -> None:  # a forward hook's return value would replace the output
        stack.pop()

    for name, sub in module.named_modules():
        entry = (name or "<model>", type(sub).__name__)
        sub.register_forward_pre_hook(lambda *_, entry=entry: stack.append(entry))
        sub.register_forward_hook(leave)
    return stack

