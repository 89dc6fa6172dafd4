"""A round's statistics and its history record, summed over replicas in few collectives.

At every round end each replica adds its training loss, samples, distance to the merge and
discarded steps, and the sums over replicas make the round's history record. Evaluation joins
them: after a merge every replica holds the merged model, so each process evaluates its own
slice of the validation data and the slices' sums ride along, instead of every other worker
waiting while rank 0 evaluates all of it.

Summing is a collective, and a collective costs about as much as a small merge on gloo
(~1.5 ms between two processes on the 2-core test VM, whatever its size): with a merge every
16 steps that alone was ~10% of the time. So the rounds of an epoch are summed together, in
one collective, at the epoch's end; with checkpoints (which save the history) or a shared model
(whose workers must wait while it is evaluated) every round is summed at once.

A record also carries rank 0's collectives of its round, for unison.linkmodel: ``comm_s`` (the
seconds inside them), ``collectives`` (the strategy's, kind → [calls, payload bytes]) and
``bookkeeping`` (unison's own: the sums of records, checkpoint gathers); summing the records of
an epoch takes one all-reduce, which is counted in the next round's ``bookkeeping``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..comm.base import Communicator, uncounted
from ..data import CLASSIFICATION
from ..errors import WorkerError
from ..history import History

if TYPE_CHECKING:
    from .view import ReplicaView

# one row per round: what each replica adds, summed over replicas
LOSS, SAMPLES, DISTANCE, DISCARDED, VAL_LOSS, VAL_CORRECT, WAIT, DROPPED, DROPPED_MASK, FAILED, FAILED_MASK = range(11)
COLUMNS = 11
MASK_RANKS = 52  # a float64 holds the bit mask 2^rank exactly for this many ranks
# rank 0's collectives of the round (comm.base.Traffic): seconds inside, the strategy's, unison's own
TRAFFIC = ("comm_s", "collectives", "bookkeeping")


@torch.no_grad()
def evaluation_sums(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, task: str,
                    batch: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss (float64) and, for classification, correct predictions of ``model`` on
    (x, y) in eval mode; tensors, so that no host sync happens here."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(x), batch):
        xb, yb = x[start:start + batch].to(device), y[start:start + batch].to(device)
        out = model(xb)
        total += loss_fn(out, yb).double() * len(xb)
        if task == CLASSIFICATION:
            correct += (out.argmax(dim=1) == yb).sum()
    model.train(was_training)
    return total, correct


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, task: str,
             batch: int = 8192) -> dict[str, float]:
    """Mean loss (and accuracy for classification) of ``model`` on (x, y), in eval mode."""
    total, correct = evaluation_sums(model, x, y, loss_fn, task, batch)
    metrics = {"val_loss": total.item() / len(x)}
    if task == CLASSIFICATION:
        metrics["val_acc"] = correct.item() / len(x)
    return metrics


class RoundLog:
    """One replica's side of the round records; every rank makes the same calls."""

    def __init__(self, replica: "ReplicaView", comm: Communicator, history: History, *, loss_fn: Callable,
                 validation: tuple[torch.Tensor, torch.Tensor, str] | None, steps_per_epoch: int,
                 started: float, wall_offset: float, samples_seen: int, every_round: bool,
                 progress: Any = None, simulated: bool = False, partial: bool = False):
        self.replica, self.comm, self.history, self.loss_fn = replica, comm, history, loss_fn
        self.steps_per_epoch, self.started, self.wall_offset = steps_per_epoch, started, wall_offset
        self.samples_seen, self.every_round, self.progress = samples_seen, every_round, progress
        self._pending: list[tuple[dict[str, Any], torch.Tensor]] = []
        self.simulated = simulated  # declared speeds: records carry simulated_wait_s
        self.partial = partial      # rounds may close without stragglers: records name them
        self.shares: list[int] | None = None  # balance="speed": the epoch's shares, in each record
        comm.traffic.take()  # start-up's collectives (the start broadcast) are start-up's, as measured
        self.validation = validation
        if validation is not None:  # this process's slice; a process holds len(ranks) replicas
            x, y, self.task = validation
            processes = comm.world_size // len(replica.ranks)
            mine = comm.rank // len(replica.ranks)
            self._val_x, self._val_y = x.tensor_split(processes)[mine], y.tensor_split(processes)[mine]

    def add(self, *, loss_sum: torch.Tensor, samples: torch.Tensor, distance: torch.Tensor,
            discarded: int, rollbacks: int, wait_s: float = 0.0, dropped: bool = False,
            failed: bool = False) -> None:
        """Record a round whose merge just happened (the replica holds the merged model);
        ``wait_s``: this process's simulated waiting in the round (unison.engine.pace);
        ``dropped``: this replica was a straggler, left out of the merge (min_fraction);
        ``failed``: its step raised and on_failure="continue" dropped it for good."""
        replica = self.replica
        first_row = torch.zeros_like(samples)  # per-process numbers go in its first replica's row
        val_loss, val_correct = first_row.clone(), first_row.clone()
        if self.validation is not None and len(self._val_x):
            loss, correct = evaluation_sums(replica.model, self._val_x, self._val_y, self.loss_fn, self.task)
            val_loss.view(-1)[0], val_correct.view(-1)[0] = loss, correct
        wait, out, mask, dead, dead_mask = (first_row.clone() for _ in range(5))
        first_row.view(-1)[0], wait.view(-1)[0] = float(discarded), wait_s
        bit = 2.0 ** self.comm.rank if self.comm.rank < MASK_RANKS else 0.0
        if dropped:
            out.view(-1)[0], mask.view(-1)[0] = 1.0, bit
        if failed:
            dead.view(-1)[0], dead_mask.view(-1)[0] = 1.0, bit
        stats = torch.stack([loss_sum, samples, distance.to(torch.float64), first_row, val_loss, val_correct, wait,
                             out, mask, dead, dead_mask], dim=-1)
        local = {"epoch": round(replica.step / self.steps_per_epoch, 4), "step": replica.step,
                 "wall_s": time.time() - self.started + self.wall_offset, "comm_bytes": self.comm.bytes_sent,
                 "lr": replica.optimizer.param_groups[0]["lr"], "rollbacks": rollbacks, "shares": self.shares,
                 **self.comm.traffic.take()}
        self._pending.append((local, stats))
        if self.every_round:
            self.flush()

    def flush(self) -> None:
        """Sum the pending rounds' statistics over replicas (one collective) and append their records."""
        if not self._pending:
            return
        stats = torch.stack([s for _, s in self._pending], dim=-2)  # [*replica rows, rounds, COLUMNS]
        with uncounted(self.comm):  # bookkeeping, not the strategy's traffic
            summed = self.comm.all_reduce_sum(stats).reshape(-1, len(self._pending), COLUMNS)[0].tolist()
        for (local, _), row in zip(self._pending, summed):
            self.samples_seen += int(row[SAMPLES])
            record = {"epoch": local["epoch"], "step": local["step"], "wall_s": local["wall_s"],
                      "samples": self.samples_seen, "train_loss": row[LOSS] / max(row[SAMPLES], 1.0),
                      "divergence": row[DISTANCE] / self.comm.world_size, "comm_bytes": local["comm_bytes"],
                      "lr": local["lr"], **{k: local[k] for k in TRAFFIC if k in local}}
            if len(self.replica.ranks) > 1:  # stacked: the link model divides compute among the rows
                record["stacked_rows"] = len(self.replica.ranks)
            if local["shares"] is not None:  # balance="speed": each worker's samples this epoch
                record["shares"] = list(local["shares"])
            if self.partial:  # the replicas left out of this round's merge
                record["dropped"] = int(row[DROPPED])
                if self.comm.world_size <= MASK_RANKS:
                    record["stragglers"] = _ranks(int(row[DROPPED_MASK]), self.comm.world_size)
            if row[FAILED]:  # on_failure="continue": the workers dropped so far
                if int(row[FAILED]) == self.comm.world_size:
                    raise WorkerError(f"every worker's training step failed (on_failure='continue' goes on only "
                                      f"while one is left); the first failure was warned about", rank=self.comm.rank)
                record["failed_workers"] = _ranks(int(row[FAILED_MASK]), self.comm.world_size)
            if self.simulated:  # seconds all workers waited in this round to simulate their speeds
                record["simulated_wait_s"] = row[WAIT]
            if row[DISCARDED]:  # steps discarded so far, summed over replicas, and rollbacks
                record |= {"discarded_steps": int(row[DISCARDED]), "rollbacks": local["rollbacks"]}
            if self.validation is not None:
                record["val_loss"] = row[VAL_LOSS] / len(self.validation[0])
                if self.task == CLASSIFICATION:
                    record["val_acc"] = row[VAL_CORRECT] / len(self.validation[0])
            self.history.append(record)
        self._pending.clear()
        if self.progress is not None:
            record = self.history.records[-1]
            self.progress.set_postfix({k: f"{record[k]:.4g}" for k in ("train_loss", "val_acc") if k in record})


def _ranks(mask: int, world_size: int) -> list[int]:
    """The ranks whose bits are set in ``mask`` (only ranks below MASK_RANKS have one)."""
    return [r for r in range(min(world_size, MASK_RANKS)) if mask >> r & 1]
