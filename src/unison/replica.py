"""One replica and its training loop: the same loop runs under every backend, for 1..N workers.

Per step: take this replica's next batch, forward, loss + penalty, backward, let the strategy
handle the gradients (sync averages them), set the scheduled lr, optimizer step, project onto
the constraint; then ask the strategy whether a round ends, and if so merge, project, evaluate
(each process its slice) and record; the records' sums over replicas are taken once an epoch
(unison.rounds).

The loop never assumes one replica per call: on the stacked backend ``build`` makes an object
holding R replicas (unison.stacked) whose losses, sample counts and distances are [R] tensors.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .comm.base import Communicator
from .config import TrainConfig
from .data import CLASSIFICATION, TrainData
from .errors import ConfigError, UnisonError, WorkerError
from .history import History
from .nonfinite import GOOD, ROLLED_BACK, NonFiniteGuard
from .penalties import Constraint, Penalty
from .recovery import Checkpointer
from .rounds import RoundLog, evaluate
from .schedules import Schedule


def _flatten(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.empty(0, device=device)
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@torch.no_grad()
def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error; a (n, 1) output meets a (n,) target without broadcasting to (n, n)."""
    if output.shape != target.shape and output.numel() == target.numel():
        output = output.reshape(target.shape)
    return F.mse_loss(output, target)


def resolve_loss(loss: str | Callable | None, task: str) -> Callable:
    if callable(loss):
        return loss
    if loss == "custom":
        raise ConfigError("loss='custom' needs a callable(output, target) -> loss passed to fit(); "
                          "a run file accepts 'cross_entropy' or 'mse'")
    name = loss or ("cross_entropy" if task == CLASSIFICATION else "mse")
    return F.cross_entropy if name == "cross_entropy" else mse


def build_optimizer(params, config: TrainConfig, custom: Callable | None) -> torch.optim.Optimizer:
    params = list(params)
    if custom is not None:
        optimizer = custom(params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer callable returned {type(optimizer).__name__}; "
                              "expected a torch.optim.Optimizer")
        return optimizer
    if config.optimizer == "custom":
        raise ConfigError("optimizer='custom' needs a callable(params) -> Optimizer passed to fit(); "
                          f"a run file accepts {', '.join(repr(o) for o in ('sgd', 'adam', 'adamw'))}")
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, nesterov=config.nesterov)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


class Replica:
    """A worker's copy of the model with its own optimizer, and flat views for exchanging it.

    unison.stacked.StackedReplica offers the same interface for R replicas at once: there the
    per-replica quantities (flat views, losses, sample counts, distances) carry a leading
    replica dimension, ``local_shape`` is (R,) and ``ranks`` lists R ranks.
    """

    local_shape: tuple[int, ...] = ()   # the shape of one loss, sample count or distance

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                 device: torch.device, *, penalty: Penalty | None = None,
                 constraint: Constraint | None = None, schedule: Schedule | None = None,
                 validation: tuple[torch.Tensor, torch.Tensor, str] | None = None, rank: int = 0):
        self.model, self.optimizer, self.loss_fn, self.device = model, optimizer, loss_fn, device
        self.ranks = (rank,)           # the replica ranks whose shares this object trains on
        self.penalty, self.constraint, self.schedule = penalty, constraint, schedule
        self.validation = validation   # (x, y, task): what greedy soups score candidates on
        self.parameters = list(model.parameters())
        # Only these get gradients; frozen parameters are left exactly as they are.
        self.trainable = [p for p in self.parameters if p.requires_grad]
        self.float_buffers = [b for b in model.buffers() if b.is_floating_point()]
        self.num_parameters = sum(p.numel() for p in self.trainable)
        self.initial_lrs = [group["lr"] for group in optimizer.param_groups]
        # One flat buffer of which every .grad is a view (as DDP's gradient buckets are), so that
        # zeroing, checking and exchanging the gradients are one operation each; adopted after the
        # first backward pass (see _adopt_flat_grad). grad_carrier is its first element.
        self.flat_grad: torch.Tensor | None = None
        self.grad_carrier: torch.Tensor | None = None
        self._flat_grad_pending = True
        self.step = 0                  # optimizer steps taken, counted across epochs
        self.samples_since_merge = 0   # the replica's weight in the next merge
        # A strategy's own tensors (diloco's θ and outer momentum); checkpoints keep them.
        self.strategy_state: dict[str, torch.Tensor] = {}
        self._scratch: nn.Module | None = None
        # The last batch, to explain a failed step; in_forward: the failure is in the next step.
        self.last_input = self.last_output = self.last_target = None
        self.in_forward = False

    def gradients(self, x: torch.Tensor, y: torch.Tensor, batches: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Gradients on this step's batch (``batches`` holds one index tensor per rank in
        ``ranks``); returns (loss, samples). A share that is used up gives no gradient and
        (0, 0): the replica may still take a shared step."""
        (batch,) = batches
        if not len(batch):
            self.zero_grad()
            return torch.zeros((), device=self.device), 0
        return self.forward_backward(x[batch], y[batch]), len(batch)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradients of loss + penalty; returns the loss alone (the data term J)."""
        self.in_forward = True
        self.zero_grad()
        self.last_input, self.last_output, self.last_target = x, None, y
        output = self.model(x)
        self.last_output = output.detach() if isinstance(output, torch.Tensor) else output
        loss = self.loss_fn(output, y)
        (loss + self.penalty(self.trainable) if self.penalty is not None else loss).backward()
        self.in_forward = False
        if self._flat_grad_pending:
            self._adopt_flat_grad()
        return loss.detach()

    def zero_grad(self) -> None:
        """Zero the flat gradient buffer in place; without one, drop the gradients (None)."""
        if self.flat_grad is not None:
            self.flat_grad.zero_()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def _adopt_flat_grad(self) -> None:
        """Move the gradients into one buffer and make each .grad a view of it; autograd then
        accumulates into the views in place. Only when the first backward pass reached every
        trainable parameter with a dense gradient, all of one dtype and device: a parameter that
        a later step does not reach then gets a zero gradient where torch would leave None."""
        self._flat_grad_pending = False
        grads = [p.grad for p in self.trainable]
        if not grads or any(g is None or g.layout != torch.strided for g in grads):
            return
        if len({(p.dtype, p.device) for p in self.trainable}) != 1 or not all(p.is_contiguous() for p in self.trainable):
            return
        self.flat_grad = _flatten(grads, self.device)
        offset = 0
        for p in self.trainable:
            p.grad = self.flat_grad[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.grad_carrier = self.flat_grad[:1]

    def optimizer_step(self, steps_per_epoch: int, total_steps: int, *, shared: bool = False,
                       samples: int = 1) -> None:
        """The scheduled lr for this global step, the optimizer's step, then the projection;
        only if the step is ``shared`` by all replicas or this replica had ``samples``."""
        if not (shared or samples):
            return
        if self.schedule is not None:
            factor = self.schedule.factor(self.step - 1, steps_per_epoch, total_steps)
            for group, initial in zip(self.optimizer.param_groups, self.initial_lrs):
                group["lr"] = initial * factor
        self.optimizer.step()
        self.project()

    def project(self) -> None:
        if self.constraint is not None:
            self.constraint.project(self.trainable)

    def score(self, state: torch.Tensor) -> float:
        """Validation accuracy (or minus the loss, for regression) of this model with ``state``
        (a state_vector) loaded; higher is better. The replica itself is left unchanged."""
        if self.validation is None:
            raise ConfigError("scoring a merge candidate needs validation data")
        if self._scratch is None:
            self._scratch = copy.deepcopy(self.model)
        trainable = [p for p in self._scratch.parameters() if p.requires_grad]
        _unflatten_into(state, trainable + [b for b in self._scratch.buffers() if b.is_floating_point()])
        x, y, task = self.validation
        metrics = evaluate(self._scratch, x, y, self.loss_fn, task)
        return metrics["val_acc"] if "val_acc" in metrics else -metrics["val_loss"]

    def state_vector(self, parameters: bool = True) -> torch.Tensor:
        """Trainable parameters (unless ``parameters=False``) then floating buffers, as one
        flat copy: what a merge averages. Frozen parameters are equal everywhere already."""
        return _flatten((self.trainable if parameters else []) + self.float_buffers, self.device)

    def load_state_vector(self, flat: torch.Tensor, parameters: bool = True) -> None:
        _unflatten_into(flat, (self.trainable if parameters else []) + self.float_buffers)

    def grad_vector(self) -> torch.Tensor:
        """The trainable parameters' gradients as one flat copy; a missing gradient (no batch
        left, or a parameter this batch did not reach) counts as zeros. A trainable parameter
        that no replica reached thus gets a zero gradient where torch would skip it."""
        if self.flat_grad is not None:
            return self.flat_grad.clone()
        return _flatten([p.grad if p.grad is not None else torch.zeros_like(p)
                         for p in self.trainable], self.device)

    @torch.no_grad()
    def load_grad_vector(self, flat: torch.Tensor) -> None:
        if self.flat_grad is not None:
            self.flat_grad.copy_(flat)
            return
        for p in self.trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        _unflatten_into(flat, [p.grad for p in self.trainable])

    def _moments(self) -> list[torch.Tensor]:
        """Optimizer state shaped like its parameter (momentum, Adam's moments), in a fixed order."""
        return [value for p in self.trainable for _, value in sorted(self.optimizer.state[p].items())
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == p.shape]

    def optimizer_vector(self) -> torch.Tensor:
        return _flatten(self._moments(), self.device)

    def load_optimizer_vector(self, flat: torch.Tensor) -> None:
        _unflatten_into(flat, self._moments())


@dataclass
class Job:
    """Everything a worker needs; picklable, so the processes backend can send it."""

    config: TrainConfig
    data: TrainData
    model: nn.Module                  # the start: rank 0's weights are broadcast to all
    optimizer: Callable | None = None
    loss: Callable | None = None
    started: float = 0.0              # time.time() when fit() was called
    progress: bool = False
    history_path: str | None = None   # rank 0 appends one JSON line per round
    resume: Any = None                # a unison.checkpoint.Checkpoint to continue from


@dataclass
class Outcome:
    state: dict[str, torch.Tensor]    # the merged model, on CPU
    history: list[dict[str, Any]]     # complete on rank 0
    startup_s: float                  # fit() called -> first training step (rank 0)


def build_replica(job: Job, comm: Communicator, device: torch.device, loss_fn: Callable,
                  validation: tuple[torch.Tensor, torch.Tensor, str] | None) -> Replica:
    """This rank's replica: a copy of the start model, made identical on every rank by a
    broadcast from rank 0 (or, for a strategy that ``shares_model``, the start model's storage)."""
    config = job.config
    model = copy.deepcopy(job.model).to(device)  # threads share job.model: never train it in place
    if config.strategy.shares_model:
        _share_storage(model, job.model)
    else:
        with torch.no_grad():  # identical starts by construction, whatever each rank built
            for tensor in list(model.parameters()) + list(model.buffers()):
                comm.broadcast(tensor, src=0)
    return Replica(model, build_optimizer(model.parameters(), config, job.optimizer), loss_fn, device,
                   penalty=config.penalty, constraint=config.constraint, schedule=config.schedule,
                   validation=validation, rank=comm.rank)


def run(job: Job, comm: Communicator, device: torch.device | None = None,
        build: Callable[..., "Replica"] | None = None) -> Outcome:
    """Train one replica to the end; every rank of a run calls this with its communicator.

    An exception from the model, the loss or the optimizer comes back as a WorkerError that
    names this replica, the step and the shapes involved (the traceback is its ``cause``).
    ``build`` makes the replica (default build_replica); the stacked backend passes one that
    makes R replicas at once (unison.stacked), with a communicator that reduces over them.
    """
    where: dict[str, Any] = {}
    try:
        return _run(job, comm, device, where, build or build_replica)
    except UnisonError:
        raise
    except Exception as exc:
        raise _step_failure(exc, comm.rank, where) from exc


def _step_failure(exc: Exception, rank: int, where: dict[str, Any]) -> WorkerError:
    import traceback

    replica = where.get("replica")
    if replica is None:
        return WorkerError(f"worker {rank} failed before training: {type(exc).__name__}: {exc}",
                           rank=rank, cause=traceback.format_exc())
    shapes = ""
    in_forward = getattr(replica, "in_forward", False)  # stacked replicas do not record their batch
    if in_forward and isinstance(getattr(replica, "last_output", None), torch.Tensor):  # the loss failed
        shapes = (f" (model output of shape {tuple(replica.last_output.shape)}, "
                  f"targets of shape {tuple(replica.last_target.shape)})")
    return WorkerError(f"worker {rank} failed at step {replica.step + in_forward}{shapes}: "
                       f"{type(exc).__name__}: {exc}", rank=rank, cause=traceback.format_exc())


def _run(job: Job, comm: Communicator, device: torch.device | None, where: dict[str, Any],
         build: Callable[..., "Replica"]) -> Outcome:
    device = device or torch.device("cpu")
    config, data, strategy, partition = job.config, job.data, job.config.strategy, job.config.partition
    rank, world_size, batch_size = comm.rank, comm.world_size, config.batch_size
    loss_fn = resolve_loss(job.loss, data.task)
    x, y = (data.x, data.y) if device.type == "cpu" else (data.x.to(device), data.y.to(device))
    validation = None
    if data.x_val is not None:
        validation = (data.x_val.to(device), data.y_val.to(device), data.task)
    replica = build(job, comm, device, loss_fn, validation)
    where["replica"] = replica
    n = len(x)
    steps_per_epoch = max(math.ceil(size / batch_size) for size in partition.sizes(n, world_size))
    total_steps = steps_per_epoch * config.epochs
    history = History(job.history_path if rank == 0 else None)
    progress = _progress_bar(job, strategy, rank)
    strategy.begin(replica, comm)

    loss_sum = torch.zeros(replica.local_shape, dtype=torch.float64, device=device)
    samples_seen = last_round_step = 0
    # Reliability (unison.recovery, unison.nonfinite): continue from a checkpoint, write them at
    # round ends, and agree on every step whether it was finite.
    checkpointer = Checkpointer(job, comm, replica, steps_per_epoch)
    guard = NonFiniteGuard(config.nan, replica, comm)
    resumed = checkpointer.restore(guard)
    start_epoch, start_index, wall_offset = 0, 0, 0.0
    if resumed is not None:
        last_round_step, samples_seen, wall_offset = resumed.step, resumed.samples_seen, resumed.wall_s
        history.records = list(resumed.history)
        start_epoch, start_index = ((resumed.step // steps_per_epoch, 0) if resumed.epoch_end else
                                    ((resumed.step - 1) // steps_per_epoch, (resumed.step - 1) % steps_per_epoch + 1))
    guard.remember_merged_state()

    # Round records: summed over replicas in one collective per epoch (see unison.rounds).
    rounds = RoundLog(replica, comm, history, loss_fn=loss_fn, validation=validation,
                      steps_per_epoch=steps_per_epoch, started=job.started, wall_offset=wall_offset,
                      samples_seen=samples_seen, progress=progress,
                      every_round=bool(checkpointer.directory) or strategy.shares_model)

    def end_round(epoch_end: bool) -> None:
        nonlocal last_round_step
        if guard.rolled_back_at_round_end():  # a local step was not finite: undo the round
            loss_sum.zero_()
            last_round_step = replica.step
            return
        # the merge's weight is the round's samples
        round_samples = torch.as_tensor(replica.samples_since_merge, dtype=torch.float64, device=device)
        distance = strategy.merge_replicas(replica, comm)
        replica.project()  # a robust merge need not stay inside the constraint set
        rounds.add(loss_sum=loss_sum.clone(), samples=round_samples, distance=distance,
                   discarded=guard.discarded, rollbacks=guard.rollbacks)
        loss_sum.zero_()
        replica.samples_since_merge = 0
        last_round_step = replica.step
        guard.remember_merged_state()
        checkpointer.round_ended(epoch_end=epoch_end, samples_seen=rounds.samples_seen, history=history.records,
                                 guard=guard)

    startup_s = time.time() - job.started
    if progress is not None and start_epoch:
        progress.update(start_epoch)
    for epoch in range(start_epoch, config.epochs):
        orders = [partition.indices(n, world_size, r, epoch, config.seed).to(device) for r in replica.ranks]
        for i in range(start_index if epoch == start_epoch else 0, steps_per_epoch):
            loss, count = replica.gradients(x, y, [order[i * batch_size:(i + 1) * batch_size] for order in orders])
            replica.step += 1
            # stacked replicas give one loss per replica: their sum is finite exactly when all are
            guard.before_exchange(loss.sum() if loss.dim() else loss)
            shared = strategy.on_gradients(replica, comm, replica.step, count)
            verdict = guard.check(shared)  # a bad step is handled there (see unison.nonfinite)
            if verdict == GOOD:
                replica.optimizer_step(steps_per_epoch, total_steps, shared=shared, samples=count)
                loss_sum += loss * count
                replica.samples_since_merge += count
            elif verdict == ROLLED_BACK:
                loss_sum.zero_()
            if strategy.round_ends(replica.step, epoch_end=False):
                end_round(epoch_end=False)
        if strategy.round_ends(replica.step, epoch_end=True) or (
                epoch == config.epochs - 1 and last_round_step != replica.step):  # a last merge
            end_round(epoch_end=True)
        rounds.flush()  # the epoch's records, in one collective
        if progress is not None:
            progress.update(1)
    if last_round_step != replica.step:  # (resumed after the last epoch's steps, before its merge)
        end_round(epoch_end=True)
        rounds.flush()
    checkpointer.finish()
    if progress is not None:
        progress.close()
    state = {k: v.detach().to("cpu", copy=True) for k, v in replica.model.state_dict().items()}
    return Outcome(state=state, history=history.records, startup_s=startup_s)


def _share_storage(model: nn.Module, shared: nn.Module) -> None:
    """Point ``model``'s parameters and buffers at ``shared``'s storage: each replica keeps its
    own Parameter objects (so its own gradients) while all of them update the same numbers."""
    own, theirs = dict(model.named_modules()), dict(shared.named_modules())
    for name, module in own.items():
        for key, param in module._parameters.items():
            if param is not None:
                param.data = theirs[name]._parameters[key].data
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = theirs[name]._buffers[key]


def _progress_bar(job: Job, strategy: Any, rank: int):
    if not job.progress or rank != 0:
        return None
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI, pipes).
    return tqdm(total=job.config.epochs, unit="epoch", desc=strategy.spec(), leave=False, disable=None)
