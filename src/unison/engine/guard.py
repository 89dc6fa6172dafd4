"""What a non-finite step does: the replicas agree on it, then stop, skip it or roll back.

The check runs after every backward pass and before the optimizer step, so a bad step never
reaches the weights: a step is bad when a replica's loss, or the gradient it is about to apply,
is not finite. Before any exchange the loss is folded into one gradient element (``+ loss·0``:
unchanged if finite, NaN if not), so one pass over the gradient checks both; the gradients'
sums are finite exactly when every element is (an exploding gradient whose float32 sum
overflows counts as non-finite too).

Where the replicas must agree, they agree without a collective of their own:

- a shared step (``on_gradients`` returned True: sync, periodic's warm-up) applies the same
  averaged gradient everywhere, and a non-finite loss or gradient on any replica makes it
  non-finite: the verdict rides on the gradient all-reduce, identical on every replica, which
  all act at that step (as torchft discards a failed step on every replica).
- a local step (periodic, oneshot) changes only its own replica until the next merge, so the
  replica acts alone: ``skip`` discards its step, ``stop`` raises at once (the launcher ends
  the others, or they learn at their next collective), ``rollback`` discards its step and asks
  for a rollback, which all replicas then take together at the round end instead of merging
  (one tiny all-reduce per round, only with ``nan="rollback"``). No per-step collective: it
  would lock local replicas into step and cost more than the step itself on small models.

Policies: ``stop`` raises NonFiniteError naming the step and the replica; ``skip`` discards the
step (no optimizer step, its samples and loss not counted); ``rollback`` returns every replica
to the last merged state, clears the optimizer state and halves the learning rate, at most
``MAX_ROLLBACKS`` times, then stops.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..comm.base import PeerFailed, uncounted
from ..errors import NonFiniteError

if TYPE_CHECKING:
    from ..comm.base import Communicator
    from .view import ReplicaView

MAX_ROLLBACKS = 3
GOOD, SKIPPED, ROLLED_BACK = "good", "skipped", "rolled back"
_REASONS = {
    1: "its batch has non-finite features",
    2: "the model's output is non-finite (its input is finite)",
    3: "the loss is non-finite although the model's output is finite (check the targets and the loss)",
    4: "its gradient is non-finite although the loss is finite (exploding gradients)",
}


def _sum(gradient: torch.Tensor) -> torch.Tensor:
    """Finite exactly when every element is; half precision is summed in float32 (its own range
    would overflow on a healthy gradient)."""
    return gradient.sum(dtype=torch.float32) if gradient.element_size() < 4 else gradient.sum()


class NonFiniteGuard:
    """One replica's side of the per-step check; every rank of a run makes the same calls."""

    def __init__(self, policy: str, replica: "ReplicaView", comm: "Communicator"):
        self.policy, self.replica, self.comm = policy, replica, comm
        self.rollbacks = 0     # how often the replicas went back to the last merged state
        self.discarded = 0     # this replica's steps skipped or rolled back
        self._merged: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None
        self._rollback_asked_at = 0  # a local step that asked for a rollback at the round end

    def remember_merged_state(self) -> None:
        """Called at the start and after every merge: the state a rollback returns to."""
        if self.policy == "rollback":
            self._merged = self.replica.state_vector()

    def before_exchange(self, loss: torch.Tensor | None) -> None:
        """Fold the loss into the gradient, so that checking the gradient checks both and a
        shared exchange carries a non-finite loss to every replica."""
        self._loss = loss
        if loss is None:
            return
        # The first parameter with elements (its gradient holds a flat buffer's first element):
        # it travels last in an exchange overlapped with the pass (strategies/buckets.py).
        first = next((p for p in self.replica.trainable if p.numel()), None)
        if first is None:
            return
        carrier = first.grad
        if carrier is None:  # the backward pass did not reach it: poison it explicitly
            if bool(torch.isfinite(loss)):
                return
            carrier = first.grad = torch.zeros_like(first)
        with torch.no_grad():  # x + 0·loss is x exactly (-0.0 too) when the loss is finite, NaN if not
            carrier[(0,) * carrier.dim()].add_(loss.to(carrier.dtype), alpha=0)

    def check(self, shared: bool) -> str:
        """GOOD, or act on a bad step and say what was done (SKIPPED, ROLLED_BACK); raises
        NonFiniteError when the policy stops the run. ``shared``: all replicas took this step
        with the same averaged gradient, and so reach the same verdict."""
        if self.comm.peer_failed():  # a local step never meets the others: look up now and then
            raise PeerFailed("another worker failed", rank=self.comm.rank)
        if self.replica.flat_grad is not None:  # one pass over one buffer, one host sync
            if math.isfinite(_sum(self.replica.flat_grad).item()):
                return GOOD
        else:
            grads = [p.grad for p in self.replica.trainable if p.grad is not None]
            if not grads or math.isfinite(torch.stack([_sum(g) for g in grads]).sum().item()):  # one host sync
                return GOOD
        self.replica.zero_grad()
        self.discarded += 1
        if shared:  # every replica is here; the rare bad path may afford a collective
            return self._act_together(self._exchange(self._diagnose(local_gradient=False)))
        code = self._diagnose(local_gradient=True)
        if self.policy == "stop":
            self._stop([code if r == self.comm.rank else 0 for r in range(self.comm.world_size)])
        if self.policy == "rollback" and not self._rollback_asked_at:
            self._rollback_asked_at = self.replica.step
        return SKIPPED

    def rolled_back_at_round_end(self) -> bool:
        """At a round end, before the merge: did a local step ask for a rollback? Then every
        replica returns to the last merged state instead of merging (one tiny all-reduce)."""
        if self.policy != "rollback":
            return False
        asked = self._exchange(self._rollback_asked_at)
        self._rollback_asked_at = 0
        if not any(asked):
            return False
        self._rollback([-1 if step else 0 for step in asked], min(s for s in asked if s))
        return True

    def state(self) -> dict[str, int]:
        return {"rollbacks": self.rollbacks, "discarded": self.discarded}

    def load_state(self, state: dict[str, int]) -> None:
        self.rollbacks, self.discarded = int(state["rollbacks"]), int(state["discarded"])

    def _diagnose(self, local_gradient: bool) -> int:
        """Why this replica's step is bad (a key of _REASONS), 0 if it is not. With a shared
        gradient, only a replica whose own loss is not finite is to blame."""
        loss_bad = self._loss is not None and not bool(torch.isfinite(self._loss))
        if not (loss_bad or local_gradient):
            return 0
        features, output = self.replica.last_input, self.replica.last_output
        if isinstance(features, torch.Tensor) and features.is_floating_point() and not bool(torch.isfinite(features).all()):
            return 1
        if isinstance(output, torch.Tensor) and output.is_floating_point() and not bool(torch.isfinite(output).all()):
            return 2
        return 3 if loss_bad else 4

    def _exchange(self, value: int) -> list[int]:
        """Every rank's ``value``, by one all-reduce of a world_size-element vector."""
        if self.comm.world_size == 1:
            return [value]
        flags = torch.zeros(self.comm.world_size, dtype=torch.float64, device=self.replica.device)
        flags[self.comm.rank] = value
        with uncounted(self.comm):
            self.comm.all_reduce_sum(flags)
        return [int(v) for v in flags.tolist()]

    def _act_together(self, codes: list[int]) -> str:
        if self.policy == "skip":
            return SKIPPED
        if self.policy == "stop":
            self._stop(codes)
        self._rollback(codes, self.replica.step)
        return ROLLED_BACK

    def _rollback(self, codes: list[int], step: int) -> None:
        if self.rollbacks >= MAX_ROLLBACKS:
            self._stop(codes, step, f"nan='rollback' gave up after {MAX_ROLLBACKS} rollbacks")
        replica = self.replica
        replica.load_state_vector(self._merged)
        replica.optimizer.state.clear()
        for group in replica.optimizer.param_groups:
            group["lr"] *= 0.5
        # a schedule sets every step's lr from the initial ones: halve those too
        replica.initial_lrs = [lr * 0.5 for lr in replica.initial_lrs]
        replica.samples_since_merge = 0
        self.rollbacks += 1

    def _stop(self, codes: list[int], step: int | None = None, policy: str = "nan='stop'") -> None:
        """``codes``: per rank, a key of _REASONS, -1 (bad, reason unknown here) or 0 (good)."""
        step = self.replica.step if step is None else step
        bad = [rank for rank, code in enumerate(codes) if code]
        where = "; ".join(f"replica {rank}" + (f": {_REASONS[code]}" if code in _REASONS else "")
                          for rank, code in enumerate(codes) if code)
        raise NonFiniteError(f"step {step} is not finite ({where or 'the averaged gradient is non-finite'}); "
                             f"{policy} ended the run", rank=bad[0] if bad else None, step=step, replicas=tuple(bad))
