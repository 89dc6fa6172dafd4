"""The Strategy interface: when replicas exchange what.

The replica loop asks a strategy three things and nothing else: what to do with this step's
gradients, whether a round ends here, and how to merge at a round end. A strategy talks to the
other replicas only through the communicator it is handed.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:  # typing only: strategies never import the loop, a launcher or a model
    from ..comm.base import Communicator
    from ..replica import Replica

OPTIMIZER_STATES = ("keep", "reset", "average")


class Strategy(ABC):
    """Base class; subclasses are frozen dataclasses whose fields are the options."""

    name: ClassVar[str] = ""
    # Capabilities a backend must offer (e.g. "shared_memory"); fit() checks them up front.
    needs: ClassVar[frozenset[str]] = frozenset()

    def world_size(self, workers: int) -> int:
        """How many replicas to run when the user asked for ``workers``."""
        return workers

    def on_gradients(self, replica: "Replica", comm: "Communicator", step: int, weight: int) -> bool:
        """Called after every backward pass (``step`` counts from 1, ``weight`` is this replica's
        batch size, 0 if its share is used up). Return True if all replicas take this step
        together (then a replica without a batch still steps with the shared gradient)."""
        return False

    @abstractmethod
    def round_ends(self, step: int, epoch_end: bool) -> bool:
        """Whether a round ends after global step ``step``; asked once after each step with
        ``epoch_end=False`` and once more at each epoch end with ``epoch_end=True``."""

    def merge(self, replica: "Replica", comm: "Communicator") -> torch.Tensor:
        """Merge the replicas at a round end; return this replica's distance to the merge."""
        return average(replica, comm)

    def spec(self) -> str:
        """The string parse() turns back into this strategy, e.g. ``periodic(every=16)``."""
        changed = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default]
        return f"{self.name}({', '.join(changed)})" if changed else self.name

    def __str__(self) -> str:
        return self.spec()


def average(replica: "Replica", comm: "Communicator", *, parameters: bool = True,
            optimizer_state: str = "keep") -> torch.Tensor:
    """Set every replica to the weighted mean of parameters and floating buffers.

    Each replica weighs by the samples it trained on since the last merge (FedAvg's weighting;
    equal shares make it the plain mean). With ``parameters=False`` only buffers (BatchNorm
    statistics) are averaged, for strategies whose parameters are identical by construction.
    Optimizer state is then kept (as torch's model averagers do), reset, or averaged too.
    Returns the Euclidean distance of this replica's parameters to the mean, before the merge.
    """
    distance = torch.zeros((), device=replica.device)
    weight = float(replica.samples_since_merge)
    state = replica.state_vector(parameters=parameters)
    if state.numel():
        n = replica.num_parameters if parameters else 0
        before = state[:n].clone()
        comm.all_reduce_mean(state, weight)
        distance = torch.linalg.vector_norm(before - state[:n])
        replica.load_state_vector(state, parameters=parameters)
    if optimizer_state == "reset":
        replica.optimizer.state.clear()
    elif optimizer_state == "average":
        moments = replica.optimizer_vector()
        comm.all_reduce_mean(moments, weight)
        replica.load_optimizer_vector(moments)
    return distance


def all_reduce_gradients(replica: "Replica", comm: "Communicator", weight: int) -> None:
    """Replace every gradient by the batch-size-weighted mean over replicas: the update of one
    large batch, θ ← θ − α·(1/b)·Σ∇J(θ; xᵢ, yᵢ), as in DistributedDataParallel."""
    grads = replica.grad_vector()
    comm.all_reduce_mean(grads, float(weight))
    replica.load_grad_vector(grads)
