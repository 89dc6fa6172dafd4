"""Stacked replicas: R copies of one model trained as one batched computation (torch.func).

The replicas' parameters and buffers are stacked along a new first dimension
(``torch.func.stack_module_state``); one call of the model, vmapped over that dimension
(``torch.func.vmap`` over ``torch.func.functional_call``), computes every replica's loss on its
own batch, and one backward pass gives every replica its own gradient, since no parameter is
shared between rows. This is PyTorch's "model ensembling" recipe (torch.func documentation),
with training added.

To the loop (``engine.loop``) and the strategies a StackedReplica is a replica (it declares
the protocol of ``engine.view``) whose per-replica quantities carry a leading replica
dimension: the flat views are [R, P], the loss, the sample count and the distance to a merge
are [R]. Its communicator (``comm/stacked.py``) reduces over that dimension, so every strategy
runs unchanged.

- Optimizer: one torch optimizer with one parameter group per replica, whose parameters are
  views of that replica's row of the stacked tensors. Elementwise optimizers (SGD with
  momentum or Nesterov, Adam, AdamW) thus update the stacked storage in place, and each
  replica keeps its own state (momentum, Adam's moments and step count) and its own group
  (its own lr), exactly as a separate replica would; a replica without a batch in a step is
  skipped the way torch skips a parameter without a gradient.
- BatchNorm: the running statistics are stacked buffers passed into the vmapped call, so
  BatchNorm's in-place update writes each replica's own row. (functorch's batch-norm notes: the
  update fails only when the buffer is not batched, which is never the case here.)
- Constraints project each replica on its own: MaxNorm's rows and UnitBall's norm are a
  replica's, never the stacked tensor's.
- Dropout draws differ per replica (``randomness="different"``), from the one seeded generator.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ..penalties import Constraint, Penalty
from ..schedules import Schedule
from ..errors import ConfigError
from .job import OptimizerSettings

if TYPE_CHECKING:
    from .job import Job
from .replica import Replica, flatten, unflatten_into
from .view import ReplicaView


class StackedReplica(ReplicaView):
    """``replicas`` replicas of ``model`` (ranks ``rank`` .. ``rank + replicas - 1``), stacked."""

    score = Replica.score  # scores a flat state on a plain copy of the model, as a Replica does
    flat_grad = None  # gradients stay per stacked tensor (see Replica.flat_grad)
    # the last batch is not recorded per replica: a failed step is explained without shapes
    last_input = last_output = last_target = None
    in_forward = False

    def __init__(self, model: nn.Module, replicas: int, loss_fn: Callable, device: torch.device,
                 optimizer: OptimizerSettings, *, penalty: Penalty | None = None,
                 constraint: Constraint | None = None, schedule: Schedule | None = None, rank: int = 0,
                 validation: tuple[torch.Tensor, torch.Tensor, str] | None = None):
        self.loss_fn, self.device, self.validation = loss_fn, device, validation
        self.penalty, self.constraint, self.schedule = penalty, constraint, schedule
        self.replicas = replicas
        self.local_shape = (replicas,)
        self.ranks = tuple(range(rank, rank + replicas))
        # One plain module: functional_call runs it on the stacked tensors, and between steps
        # it holds replica 0's state for evaluation (see ``model``).
        self._module = copy.deepcopy(model).to(device).train()
        self.params, self.buffers = stack_module_state([self._module] * replicas)
        self._trainable_names = [name for name, p in self.params.items() if p.requires_grad]
        self.trainable = [self.params[name] for name in self._trainable_names]
        self.float_buffers = [b for b in self.buffers.values() if b.is_floating_point()]
        self.num_parameters = sum(p[0].numel() for p in self.trainable)  # per replica
        # Replica r's trainable parameters as views of row r: what its optimizer group steps.
        self.rows = [[nn.Parameter(p.detach()[r]) for p in self.trainable] for r in range(replicas)]
        self.optimizer = optimizer.build([{"params": rows} for rows in self.rows])
        self.initial_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.step = 0
        self.samples_since_merge = 0
        self.strategy_state: dict[str, Any] = {}
        self._sizes = [0] * replicas  # this step's batch size per replica
        self._scratch: nn.Module | None = None
        self._losses = vmap(self._loss, randomness="different")

    @property
    def samples_since_merge(self) -> torch.Tensor:
        """Samples each replica trained on since the last merge: its weight in the next one."""
        return self._samples

    @samples_since_merge.setter
    def samples_since_merge(self, value: int | torch.Tensor) -> None:
        if not isinstance(value, torch.Tensor):
            value = torch.full((self.replicas,), value, dtype=torch.int64, device=self.device)
        self._samples = value

    @property
    def model(self) -> nn.Module:
        """Replica 0 as a plain module; after a merge every replica holds the merged model."""
        with torch.no_grad():
            for name, tensor in self._module.named_parameters():
                tensor.copy_(self.params[name][0])
            for name, tensor in self._module.named_buffers():
                tensor.copy_(self.buffers[name][0])
        return self._module

    # ---- training ----

    def _loss(self, params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(functional_call(self._module, (params, buffers), (x,)), y)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def gradients(self, x: torch.Tensor, y: torch.Tensor, batches: list[torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of loss + penalty for every replica on its batch (``batches[r]`` indexes
        replica r's samples); returns the losses and the batch sizes, one per replica.

        Replicas whose batches are equally long run as one vmapped call (all of them, unless
        shares are uneven); a replica without a batch gets no gradient and loss 0.
        """
        for p in self.trainable:
            p.grad = None
        self._sizes = [len(batch) for batch in batches]
        losses = torch.zeros(self.replicas, device=self.device)
        groups: dict[int, list[int]] = {}
        for r, size in enumerate(self._sizes):
            if size:
                groups.setdefault(size, []).append(r)
        objective = None
        for members in groups.values():
            group_losses, trainable = self._forward(x, y, members, [batches[r] for r in members])
            losses[members] = group_losses.detach()
            term = group_losses.sum() + (self.penalty(trainable) if self.penalty is not None else 0)
            objective = term if objective is None else objective + term
        if objective is not None:
            objective.backward()
        return losses, torch.tensor(self._sizes, device=self.device)

    def _forward(self, x, y, members: list[int], batches: list[torch.Tensor]):
        """The losses of replicas ``members`` on their batches, and their trainable tensors."""
        index = torch.stack(batches)
        if len(members) == self.replicas:  # the usual case: no copies, buffers updated in place
            losses = self._losses(self.params, self.buffers, x[index], y[index])
            return losses, self.trainable
        rows = torch.tensor(members, device=self.device)
        params = {name: p[rows] for name, p in self.params.items()}
        buffers = {name: b[rows] for name, b in self.buffers.items()}
        losses = self._losses(params, buffers, x[index], y[index])
        with torch.no_grad():  # the copies' updated statistics go back to their rows
            for name, b in self.buffers.items():
                b[rows] = buffers[name]
        return losses, [params[name] for name in self._trainable_names]

    def optimizer_step(self, steps_per_epoch: int, total_steps: int, *, shared: bool = False,
                       samples: torch.Tensor | None = None) -> None:
        """Step every replica that had a batch (all of them if ``shared``), at the scheduled lr,
        then project the replicas that stepped. ``samples`` is what ``gradients`` returned; the
        sizes it saw are used, so nothing is read back from the device."""
        stepping = [bool(shared or size) for size in self._sizes]
        if not any(stepping):
            return
        for r, rows in enumerate(self.rows):
            for row, stacked in zip(rows, self.trainable):
                row.grad = stacked.grad[r] if stepping[r] and stacked.grad is not None else None
        if self.schedule is not None:
            factor = self.schedule.factor(self.step - 1, steps_per_epoch, total_steps)
            for group, initial in zip(self.optimizer.param_groups, self.initial_lrs):
                group["lr"] = initial * factor
        self.optimizer.step()
        self.project([r for r in range(self.replicas) if stepping[r]])

    def project(self, replicas: list[int] | None = None) -> None:
        """Project each replica (or those listed) onto the constraint set, on its own."""
        if self.constraint is not None:
            for r in range(self.replicas) if replicas is None else replicas:
                self.constraint.project(self.rows[r])

    # ---- flat views, [R, P]: what strategies exchange ----

    def _rows_flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if not tensors:
            return torch.empty(self.replicas, 0, device=self.device)
        return torch.cat([t.detach().reshape(self.replicas, -1) for t in tensors], dim=1)

    @torch.no_grad()
    def _load_rows(self, flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        """Copy ``flat`` ([R, P], or one [P] for every replica) into the stacked ``tensors``."""
        offset = 0
        for t in tensors:
            size = t[0].numel()
            t.copy_(flat[..., offset:offset + size].reshape(*flat.shape[:-1], *t.shape[1:]))
            offset += size

    def state_vector(self, parameters: bool = True) -> torch.Tensor:
        return self._rows_flat((self.trainable if parameters else []) + self.float_buffers)

    def load_state_vector(self, flat: torch.Tensor, parameters: bool = True) -> None:
        self._load_rows(flat, (self.trainable if parameters else []) + self.float_buffers)

    def grad_vector(self) -> torch.Tensor:
        return self._rows_flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable])

    def load_grad_vector(self, flat: torch.Tensor) -> None:
        for p in self.trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._load_rows(flat, [p.grad for p in self.trainable])

    def watch_gradients(self, callback) -> bool:
        """Not watched: a stacked run is mostly one process, with nobody to overlap with, and its
        exchange reduces the rows before it talks (comm/stacked.py); it follows the backward pass."""
        return False

    def lend_grad_buffer(self, flat: torch.Tensor) -> None:
        raise NotImplementedError("stacked replicas are not watched (watch_gradients returns False)")

    def _moments(self, r: int) -> list[torch.Tensor]:
        """Replica r's optimizer state shaped like its parameters, in a fixed order."""
        return [value for p in self.rows[r] for _, value in sorted(self.optimizer.state[p].items())
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == p.shape]

    def optimizer_vector(self) -> torch.Tensor:
        return torch.stack([flatten(self._moments(r), self.device) for r in range(self.replicas)])

    def load_optimizer_vector(self, flat: torch.Tensor) -> None:
        for r in range(self.replicas):
            unflatten_into(flat[r], self._moments(r))


def check_vmappable(job: "Job") -> None:
    """Refuse, before anything starts, a model (or loss) that cannot run vmapped: two stacked
    replicas take one training step on two samples each."""
    probe = StackedReplica(job.model, 2, job.loss_fn, torch.device("cpu"), job.optimizer,
                           penalty=job.penalty, constraint=job.constraint, schedule=job.schedule)
    where = _track_modules(probe._module)
    samples = torch.arange(min(2, len(job.data.x)))
    try:
        probe.gradients(job.data.x, job.data.y, [samples, samples])
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

