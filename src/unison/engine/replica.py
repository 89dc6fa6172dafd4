"""One replica: a worker's copy of the model with its own optimizer, and flat views of it.

unison.engine.stacked.StackedReplica implements the same protocol (unison.engine.view) for R
replicas at once.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data import CLASSIFICATION
from ..errors import ConfigError
from ..penalties import Constraint, Penalty
from ..schedules import Schedule
from .records import evaluate
from .view import ReplicaView


def flatten(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.empty(0, device=device)
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@torch.no_grad()
def unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
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


class Replica(ReplicaView):
    """A worker's copy of the model with its own optimizer, and flat views for exchanging it.

    It declares the replica protocol (unison.engine.view.ReplicaView).
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
        # first backward pass (see _adopt_flat_grad), or lent by a watcher after every pass
        # (lend_grad_buffer).
        self.flat_grad: torch.Tensor | None = None
        self._flat_grad_pending = True
        self._grads_lent = False       # a watcher places the gradients (see lend_grad_buffer)
        self.step = 0                  # optimizer steps taken, counted across epochs
        self.samples_since_merge = 0   # the replica's weight in the next merge
        # A strategy's own tensors (diloco's θ and outer momentum); checkpoints keep them.
        self.strategy_state: dict[str, torch.Tensor] = {}
        self._scratch: nn.Module | None = None
        # The last batch, to explain a failed step; in_forward: the failure is in the next step.
        self.last_input = self.last_output = self.last_target = None
        self.in_forward = False
        self._batch_samples = 0        # the batch of the backward pass under way (watch_gradients)

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
        self._batch_samples = len(x)
        output = self.model(x)
        self.last_output = output.detach() if isinstance(output, torch.Tensor) else output
        loss = self.loss_fn(output, y)
        (loss + self.penalty(self.trainable) if self.penalty is not None else loss).backward()
        self.in_forward = False
        if self._flat_grad_pending:
            self._adopt_flat_grad()
        return loss.detach()

    def zero_grad(self) -> None:
        """Zero the flat gradient buffer in place; without one, or where the buffer is lent
        (lend_grad_buffer), drop the gradients (None)."""
        if self._grads_lent:  # every trainable one, in the optimizer or not (it holds a view)
            self.flat_grad = None
            for p in self.trainable:
                p.grad = None
            return
        if self.flat_grad is not None:
            self.flat_grad.zero_()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def lend_grad_buffer(self, flat: torch.Tensor) -> None:
        """Make every .grad a view of ``flat`` (the combined gradient, written by the caller)
        until the next zero_grad, which drops them: the next pass then writes each gradient
        fresh instead of adding it to zeros, as torch's ``zero_grad(set_to_none=True)`` lets
        autograd do, and the caller refills ``flat`` (DDP's ``gradient_as_bucket_view``)."""
        self._grads_lent, self._flat_grad_pending = True, False
        self._grads_as_views_of(flat)

    def _grads_as_views_of(self, flat: torch.Tensor) -> None:
        self.flat_grad = flat
        offset = 0
        for p in self.trainable:
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

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
        self._grads_as_views_of(flatten(grads, self.device))

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
        unflatten_into(state, trainable + [b for b in self._scratch.buffers() if b.is_floating_point()])
        x, y, task = self.validation
        metrics = evaluate(self._scratch, x, y, self.loss_fn, task)
        return metrics["val_acc"] if "val_acc" in metrics else -metrics["val_loss"]

    def state_vector(self, parameters: bool = True) -> torch.Tensor:
        """Trainable parameters (unless ``parameters=False``) then floating buffers, as one
        flat copy: what a merge averages. Frozen parameters are equal everywhere already."""
        return flatten((self.trainable if parameters else []) + self.float_buffers, self.device)

    def load_state_vector(self, flat: torch.Tensor, parameters: bool = True) -> None:
        unflatten_into(flat, (self.trainable if parameters else []) + self.float_buffers)

    def grad_vector(self) -> torch.Tensor:
        """The trainable parameters' gradients as one flat copy; a missing gradient (no batch
        left, or a parameter this batch did not reach) counts as zeros. A trainable parameter
        that no replica reached thus gets a zero gradient where torch would skip it."""
        if self.flat_grad is not None:
            return self.flat_grad.clone()
        return flatten([p.grad if p.grad is not None else torch.zeros_like(p)
                         for p in self.trainable], self.device)

    @torch.no_grad()
    def load_grad_vector(self, flat: torch.Tensor) -> None:
        if self.flat_grad is not None:
            self.flat_grad.copy_(flat)
            return
        for p in self.trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        unflatten_into(flat, [p.grad for p in self.trainable])

    def watch_gradients(self, callback: Callable[[int, int], None]) -> bool:
        """torch's post-accumulate-grad hooks: autograd calls them once per backward pass, after
        the last contribution to a parameter's gradient is summed in. The watcher places the
        gradients after each pass (lend_grad_buffer, or load_grad_vector), so the replica adopts
        no buffer of its own."""
        self._flat_grad_pending = False
        for i, p in enumerate(self.trainable):
            p.register_post_accumulate_grad_hook(lambda _, i=i: callback(i, self._batch_samples))
        return True

    def _moments(self) -> list[torch.Tensor]:
        """Optimizer state shaped like its parameter (momentum, Adam's moments), in a fixed order."""
        return [value for p in self.trainable for _, value in sorted(self.optimizer.state[p].items())
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == p.shape]

    def optimizer_vector(self) -> torch.Tensor:
        return flatten(self._moments(), self.device)

    def load_optimizer_vector(self, flat: torch.Tensor) -> None:
        unflatten_into(flat, self._moments())
