"""The replica protocol: the members of a replica that code outside the loop may touch.

Strategies, the non-finite guard, the round records and the checkpointer type against
``ReplicaView`` and use nothing else. ``Replica`` (one model) and ``StackedReplica`` (R models as
one vmapped computation) both declare it. For a stacked replica every per-replica quantity
carries a leading replica dimension: flat views are [R, P]; losses, sample counts, distances and
``samples_since_merge`` are [R]; ``local_shape`` is (R,) and ``ranks`` lists R ranks.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import nn


class ReplicaView(Protocol):
    # ---- identity and counters (strategies, records, checkpointer) ----
    ranks: tuple[int, ...]              # the replica ranks this object trains
    local_shape: tuple[int, ...]        # () for one replica, (R,) for R stacked ones
    device: torch.device
    step: int                           # optimizer steps taken, counted across epochs
    samples_since_merge: Any            # int, or an [R] tensor: the weight in the next merge
    num_parameters: int                 # trainable elements of one replica
    strategy_state: dict[str, torch.Tensor]   # a strategy's own tensors; checkpoints keep them

    # ---- the model and its optimizer (records evaluate, checkpointer saves, guard rolls back) ----
    model: nn.Module                    # a plain module holding (replica 0's) current state
    optimizer: torch.optim.Optimizer
    initial_lrs: list[float]            # each parameter group's lr before any schedule
    trainable: list[torch.Tensor]       # what gets gradients (stacked: [R, ...] tensors)

    # ---- flat views: what strategies exchange ----
    def state_vector(self, parameters: bool = True) -> torch.Tensor:
        """Trainable parameters (unless ``parameters=False``) then floating buffers, flat."""

    def load_state_vector(self, flat: torch.Tensor, parameters: bool = True) -> None: ...

    def grad_vector(self) -> torch.Tensor:
        """The trainable parameters' gradients, flat; a missing gradient counts as zeros."""

    def load_grad_vector(self, flat: torch.Tensor) -> None: ...

    def watch_gradients(self, callback: Callable[[int, int], None]) -> bool:
        """From the next backward pass on, call ``callback(i, samples)`` as soon as
        ``trainable[i]``'s gradient on this step's batch of ``samples`` is final, while the pass
        goes on (what DDP's bucketing hooks on); False, watching nothing, where the replica
        cannot (stacked replicas). The watcher places the combined gradients after every pass
        (``lend_grad_buffer``, or ``load_grad_vector`` where its buffer cannot hold them)."""

    def lend_grad_buffer(self, flat: torch.Tensor) -> None:
        """Every .grad a view of ``flat`` until the next ``zero_grad``, which drops them."""

    def optimizer_vector(self) -> torch.Tensor:
        """Optimizer state shaped like the parameters (momentum, Adam's moments), flat."""

    def load_optimizer_vector(self, flat: torch.Tensor) -> None: ...

    def project(self) -> None:
        """Project onto the run's constraint set (a no-op without one)."""

    def score(self, state: torch.Tensor) -> float:
        """Validation accuracy (minus the loss, for regression) of ``state``; higher is better."""

    # ---- the non-finite guard's view of the step ----
    flat_grad: torch.Tensor | None      # the one gradient buffer, when adopted (else None)
    last_input: torch.Tensor | None     # the last batch's features and model output (None
    last_output: Any                    # where not recorded), to explain a bad step

    def zero_grad(self) -> None: ...
