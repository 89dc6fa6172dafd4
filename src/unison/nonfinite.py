"""What a non-finite step does: every replica agrees on it, then stops, skips it or rolls back.

The check runs after every backward pass and before the optimizer step, so a bad step never
reaches the weights: a step is bad when a replica's loss, or the gradient it is about to apply,
is not finite. All replicas must reach the same verdict, or one of them would wait forever in
the next collective for a peer that stopped:

- a shared step (``on_gradients`` returned True: sync, periodic's warm-up) applies the same
  averaged gradient everywhere. A replica whose loss is not finite writes a NaN into its
  gradient before the exchange, so the averaged gradient carries the verdict to every replica:
  the flag rides on the gradient all-reduce and costs no collective of its own.
- a local step (periodic, oneshot): one all-reduce of a ``world_size``-element vector per step
  (4·N bytes; latency-bound, measured in the README).

Policies, as torchft discards a failed step on every replica so that they stay consistent:
``stop`` raises NonFiniteError naming the step and the replicas; ``skip`` discards the step
everywhere (no optimizer step, its samples and loss not counted); ``rollback`` returns every
replica to the last merged state, clears the optimizer state and halves the learning rate, at
most ``MAX_ROLLBACKS`` times, then stops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.nn.utils import get_total_norm

from .comm.base import uncounted
from .errors import NonFiniteError

if TYPE_CHECKING:
    from .comm.base import Communicator
    from .replica import Replica

MAX_ROLLBACKS = 3
GOOD, SKIPPED, ROLLED_BACK = "good", "skipped", "rolled back"
_REASONS = {
    1: "its batch has non-finite features",
    2: "the model's output is non-finite (its input is finite)",
    3: "the loss is non-finite although the model's output is finite (check the targets and the loss)",
    4: "its gradient is non-finite although the loss is finite (exploding gradients)",
}


class NonFiniteGuard:
    """One replica's side of the per-step check; every rank of a run makes the same calls."""

    def __init__(self, policy: str, replica: "Replica", comm: "Communicator"):
        self.policy, self.replica, self.comm = policy, replica, comm
        self.rollbacks = 0     # how often the replicas went back to the last merged state
        self.discarded = 0     # steps skipped or rolled back
        self._merged: torch.Tensor | None = None
        self._loss_bad = False

    def remember_merged_state(self) -> None:
        """Called at the start and after every merge: the state a rollback returns to."""
        if self.policy == "rollback":
            self._merged = self.replica.state_vector()

    def before_exchange(self, loss: torch.Tensor | None) -> None:
        """Note whether this replica's loss is finite; if not, poison its gradient so that a
        shared exchange carries the news to every replica."""
        self._loss_bad = loss is not None and not bool(torch.isfinite(loss))
        if self._loss_bad:
            first = self.replica.trainable[0]
            if first.grad is None:
                first.grad = torch.zeros_like(first)
            with torch.no_grad():
                first.grad[(0,) * first.dim()] = float("nan")

    def check(self, shared: bool) -> str:
        """Agree on every rank whether this step is good and act on a bad one: GOOD, SKIPPED or
        ROLLED_BACK; raises NonFiniteError when the policy stops the run."""
        grads = [p.grad for p in self.replica.trainable if p.grad is not None]
        grad_bad = not bool(torch.isfinite(get_total_norm(grads, float("inf"))))
        if shared:  # the averaged gradient is the same everywhere: so is the verdict
            if not grad_bad:
                return GOOD
            codes = self._exchange(self._diagnose(grad_bad=False))  # only on the rare bad path
        else:
            codes = self._exchange(self._diagnose(grad_bad) if self._loss_bad or grad_bad else 0)
            if not any(codes):
                return GOOD
        return self._act(codes)

    def counters(self) -> dict[str, int]:
        """For the round's history record, once something was discarded."""
        return {"discarded_steps": self.discarded, "rollbacks": self.rollbacks} if self.discarded else {}

    def state(self) -> dict[str, int]:
        return {"rollbacks": self.rollbacks, "discarded": self.discarded}

    def load_state(self, state: dict[str, int]) -> None:
        self.rollbacks, self.discarded = int(state["rollbacks"]), int(state["discarded"])

    def _diagnose(self, grad_bad: bool) -> int:
        """Why this replica's step is bad (a key of _REASONS), 0 if it is not."""
        if not (self._loss_bad or grad_bad):
            return 0
        features = getattr(self.replica, "last_input", None)
        output = getattr(self.replica, "last_output", None)
        if features is not None and features.is_floating_point() and not bool(torch.isfinite(features).all()):
            return 1
        if isinstance(output, torch.Tensor) and output.is_floating_point() and not bool(torch.isfinite(output).all()):
            return 2
        return 3 if self._loss_bad else 4

    def _exchange(self, code: int) -> list[int]:
        if self.comm.world_size == 1:
            return [code]
        flags = torch.zeros(self.comm.world_size, device=self.replica.device)
        flags[self.comm.rank] = code
        with uncounted(self.comm):
            self.comm.all_reduce_sum(flags)
        return [int(v) for v in flags.tolist()]

    def _act(self, codes: list[int]) -> str:
        replica = self.replica
        bad = [rank for rank, code in enumerate(codes) if code]
        where = "; ".join(f"replica {rank}: {_REASONS[code]}" for rank, code in enumerate(codes) if code)
        what = f"step {replica.step} is not finite ({where or 'the averaged gradient is non-finite'})"
        replica.optimizer.zero_grad(set_to_none=True)
        if self.policy == "skip":
            self.discarded += 1
            return SKIPPED
        if self.policy == "rollback" and self.rollbacks < MAX_ROLLBACKS:
            replica.load_state_vector(self._merged)
            replica.optimizer.state.clear()
            for group in replica.optimizer.param_groups:
                group["lr"] *= 0.5
            replica.samples_since_merge = 0
            self.rollbacks += 1
            self.discarded += 1
            return ROLLED_BACK
        policy = ("nan='stop'" if self.policy == "stop"
                  else f"nan='rollback' gave up after {MAX_ROLLBACKS} rollbacks")
        raise NonFiniteError(f"{what}; {policy} ended the run", rank=bad[0] if bad else None,
                             step=replica.step, replicas=tuple(bad))
