"""The Strategy interface: when replicas exchange what.

The replica loop asks a strategy three things: what to do with this step's gradients, whether
a round ends here, and how to merge the replicas at a round end (plus ``begin``, once, for
strategies that keep state of their own). A strategy talks to the other replicas only through
the communicator it is handed, and combines what it receives only through ``unison.merges``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .. import compression, merges, specs
from ..errors import ConfigError, expected

if TYPE_CHECKING:  # strategies see a replica only through its protocol, never the loop
    from ..comm.base import Communicator
    from ..engine.view import ReplicaView

OPTIMIZER_STATES = ("keep", "reset", "average")
# The capability of one model held in this machine's shared memory, that every worker updates.
SHARED_MEMORY = "shared_memory"
# The capability of messages between two ranks (Communicator.send/recv), for asynchronous strategies.
POINT_TO_POINT = "point_to_point"


class Strategy(specs.Spec, ABC):
    """Base class; subclasses are frozen dataclasses whose fields are the options."""

    # Capabilities a backend must offer (e.g. SHARED_MEMORY); the plan checks them up front.
    needs: ClassVar[frozenset[str]] = frozenset()
    # Ranks (the first ones) that serve and train no replica of their own, e.g. fedbuff's server.
    servers: ClassVar[int] = 0
    # Whether ranks exchange point-to-point messages on their own time (unison.engine.asynchronous)
    # instead of making the same collectives in the same order (the loop).
    asynchronous: ClassVar[bool] = False
    # Whether `unison compare` without --strategies runs it (unison.comparison.default_strategies).
    compared_by_default: ClassVar[bool] = True

    @property
    def shares_model(self) -> bool:
        """Whether every replica trains the one model itself (its storage shared), not a copy."""
        return SHARED_MEMORY in self.needs

    def world_size(self, workers: int) -> int:
        """How many replicas to run when the user asked for ``workers``."""
        return workers

    def check(self, world_size: int, has_validation: bool, steps: list[int]) -> None:
        """Raise ConfigError before any worker starts if these options cannot work here;
        ``steps`` is each replica's number of batches per epoch."""
        rule = getattr(self, "merge", None)
        if isinstance(rule, merges.Merge):
            rule.check(world_size)
            if rule.needs_validation and not has_validation:
                raise ConfigError(f"{self.name}(merge={rule}) scores candidate models on validation "
                                  "data, and this run has none; pass val= (data or a fraction to hold out)")

    def check_schedule(self, epochs: int, steps: list[int]) -> None:
        """Like ``check``, for options that depend on the run's length: ``epochs`` and each
        replica's batches per epoch."""

    def begin(self, replica: "ReplicaView", comm: "Communicator") -> None:
        """Called once on every replica after the common start is in place, before step 1."""

    @property
    def needs_start_gradient(self) -> bool:
        """Whether start_gradient wants each replica's full gradient over its share before step 1."""
        return False

    def start_gradient(self, replica: "ReplicaView", comm: "Communicator", gradient: torch.Tensor) -> None:
        """Called once after ``begin``, on a fresh start only (a resume restores strategy_state),
        with this replica's mean gradient at the start over its first epoch's share, flat like
        ``grad_vector``; only if ``needs_start_gradient`` (scaffold(init="gradient"))."""

    def on_gradients(self, replica: "ReplicaView", comm: "Communicator", step: int, weight: int) -> bool:
        """Called after every backward pass (``step`` counts from 1, ``weight`` is this replica's
        batch size, 0 if its share is used up). Return True if all replicas take this step
        together (then a replica without a batch still steps with the shared gradient)."""
        return False

    @property
    def partial_rounds(self) -> bool:
        """Whether a round may close before every replica finished it (``min_fraction`` < 1 or
        a ``deadline``)."""
        return getattr(self, "min_fraction", 1.0) < 1.0 or getattr(self, "deadline", None) is not None

    def deadline_at(self, step: int) -> float | None:
        """Seconds after its first replica finished it that the round of global step ``step``
        closes without the others; None: no deadline (or a warm-up step)."""
        if step <= getattr(self, "warmup", 0):
            return None
        return getattr(self, "deadline", None)

    def quorum(self, world_size: int, step: int) -> int:
        """How many replicas must have finished the round that global step ``step`` belongs to
        before it closes; the others stop where they are, their round's work left out of the
        merge. Every replica (the default), or ⌈min_fraction·N⌉ after any warm-up."""
        if getattr(self, "min_fraction", 1.0) >= 1.0 or step <= getattr(self, "warmup", 0):
            return world_size
        return max(1, math.ceil(self.min_fraction * world_size - 1e-9))

    @abstractmethod
    def round_ends(self, step: int, epoch_end: bool) -> bool:
        """Whether a round ends after global step ``step``; asked once after each step with
        ``epoch_end=False`` and once more at each epoch end with ``epoch_end=True``."""

    def merge_replicas(self, replica: "ReplicaView", comm: "Communicator") -> torch.Tensor:
        """Merge the replicas at a round end; return this replica's distance to the merge."""
        return merge_states(replica, comm, getattr(self, "merge", merges.Mean()))


def check_partial_rounds(strategy: Strategy) -> None:
    """In a strategy's __post_init__ (after parse_merge and parse_compress): min_fraction is in
    (0, 1], deadline None or seconds >= 0, and rounds that close early merge by the weighted
    mean, uncompressed (a straggler's weight is 0; a robust rule would count its vote, error
    feedback would keep its unsent change)."""
    f, deadline = strategy.min_fraction, strategy.deadline
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
        raise ConfigError(expected(f"{strategy.name}.min_fraction", f, "a number in (0, 1]: the fraction of "
                                   "workers whose finished round closes it"))
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))
                                 or not 0 <= deadline < math.inf):
        raise ConfigError(expected(f"{strategy.name}.deadline", deadline, "seconds >= 0 after the first worker "
                                   "finished a round that it closes, or none"))
    early = f"min_fraction={f}" if f < 1 else f"deadline={deadline}" if deadline is not None else None
    if early and (not isinstance(strategy.merge, merges.Mean)
                  or not isinstance(strategy.compress, compression.NoCompression)):
        raise ConfigError(f"{strategy.name}.{early} needs merge=mean and compress=none (a round's "
                          f"stragglers take part with weight 0), got merge={strategy.merge}, "
                          f"compress={strategy.compress}")


def parse_merge(strategy: Strategy) -> None:
    """In a strategy's __post_init__: turn its ``merge`` option into a Merge object."""
    object.__setattr__(strategy, "merge", merges.parse(strategy.merge))


def parse_compress(strategy: Strategy) -> None:
    """In a strategy's __post_init__ (after parse_merge): turn ``compress`` into a Compression;
    compression composes with merge=mean only (a robust rule compares whole replica vectors,
    which each replica's own compression error would decide)."""
    rule = compression.parse(strategy.compress, f"{strategy.name}.compress")
    object.__setattr__(strategy, "compress", rule)
    if not isinstance(rule, compression.NoCompression) and not isinstance(strategy.merge, merges.Mean):
        raise ConfigError(f"{strategy.name}.compress={rule} needs merge=mean, got merge={strategy.merge}; "
                          f"accepted: compress=none with any merge, or merge=mean with compress one of "
                          f"{', '.join(compression.NAMES)}")


def check_every(name: str, every: Any) -> None:
    if every != "epoch" and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ConfigError(expected(f"{name}.every", every, "an integer >= 1 or 'epoch'"))


def ends_every(every: int | str, step: int, epoch_end: bool) -> bool:
    """Whether a round of ``every`` steps (or ``"epoch"``) ends after ``step``: asked once after
    each step (``epoch_end=False``) and once more at each epoch end (``epoch_end=True``)."""
    if every == "epoch":
        return epoch_end
    return not epoch_end and step % every == 0


def merge_weight(samples: int | torch.Tensor) -> float | torch.Tensor:
    """A replica's weight in a merge: its samples as a float, or (stacked replicas) one per row."""
    return samples if isinstance(samples, torch.Tensor) else float(samples)


def combined(replica: "ReplicaView", comm: "Communicator", rule: merges.Merge, vector: torch.Tensor,
             weight: float | torch.Tensor) -> torch.Tensor:
    """Every replica's ``vector`` combined by ``rule``; the same result on every rank.

    ``mean`` is one weighted all-reduce. Other rules gather every vector (the weight rides
    along as one extra element), rank 0 combines them and broadcasts the result, so that every
    rank holds bit-identical weights even across machines that round differently. A replica
    that trained on nothing since the last merge still votes: it holds the last merged state.

    Shape-agnostic: ``vector`` is one replica's [P] or, for stacked replicas, [R, P] with one
    weight per row; the result has the shape of ``vector``.
    """
    if isinstance(rule, merges.Mean):
        return comm.all_reduce_mean(vector.clone(), weight)
    weights_column = torch.as_tensor(weight, dtype=vector.dtype, device=vector.device)
    weights_column = weights_column.expand(vector.shape[:-1]).unsqueeze(-1)
    gathered = comm.all_gather(torch.cat([vector, weights_column], dim=-1))
    merged = torch.empty_like(vector)
    if comm.rank == 0:
        states, weights = [g[:-1] for g in gathered], [float(g[-1]) for g in gathered]
        merged[...] = rule.combine(states, weights, score=replica.score if rule.needs_validation else None)
    return comm.broadcast(merged, src=0)


def merge_states(replica: "ReplicaView", comm: "Communicator", rule: merges.Merge = merges.Mean(), *,
                 parameters: bool = True, optimizer_state: str = "keep") -> torch.Tensor:
    """Set every replica to the merge of parameters and floating buffers.

    With ``mean`` each replica weighs by the samples it trained on since the last merge
    (FedAvg's weighting; equal shares make it the plain mean). With ``parameters=False`` only
    buffers (BatchNorm statistics) are averaged, for strategies whose parameters are identical
    by construction. Optimizer state is then kept (as torch's model averagers do), reset, or
    averaged. Returns the Euclidean distance of this replica's parameters to the merge (one
    per row for stacked replicas).
    """
    weight = merge_weight(replica.samples_since_merge)
    state = replica.state_vector(parameters=parameters)
    distance = torch.zeros(state.shape[:-1], device=replica.device)
    if state.numel():
        n = replica.num_parameters if parameters else 0
        merged = combined(replica, comm, rule if parameters else merges.Mean(), state, weight)
        distance = torch.linalg.vector_norm(state[..., :n] - merged[..., :n], dim=-1)
        replica.load_state_vector(merged, parameters=parameters)
    merge_optimizer_state(replica, comm, optimizer_state, weight)
    return distance


def merge_optimizer_state(replica: "ReplicaView", comm: "Communicator", optimizer_state: str,
                          weight: float | torch.Tensor) -> None:
    """After a merge: keep the optimizer state, reset it, or average it (weighted, uncompressed)."""
    if optimizer_state == "reset":
        replica.optimizer.state.clear()
    elif optimizer_state == "average":
        moments = replica.optimizer_vector()
        comm.all_reduce_mean(moments, weight)
        replica.load_optimizer_vector(moments)


def combine_gradients(replica: "ReplicaView", comm: "Communicator", weight: int,
                      rule: merges.Merge = merges.Mean()) -> None:
    """Replace every gradient by the combination over replicas. With ``mean`` (weighted by
    batch size) it is the update of one large batch, θ ← θ − α·(1/b)·Σ∇J(θ; xᵢ, yᵢ), as in
    DistributedDataParallel; a robust rule here is Blanchard et al.'s setting. Alone (single,
    or one worker) there is nothing to combine, and a missing gradient stays missing."""
    if comm.world_size == 1:
        return
    replica.load_grad_vector(combined(replica, comm, rule, replica.grad_vector(), merge_weight(weight)))
