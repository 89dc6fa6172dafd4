"""run(): the one training loop, for every backend and 1..N workers, read top to bottom.

Per step: this replica's next batch, forward, loss + penalty, backward; the strategy handles
the gradients (sync averages them); the guard checks the step; the scheduled lr, the optimizer
step and the projection. When the strategy says a round ends: merge, project, evaluate (each
process its slice) and record; the records' sums over replicas are taken once an epoch
(unison.engine.records), and the checkpointer writes at round ends.

Uneven workers (issue 15): declared ``speeds`` wait out a simulated slowdown after each step's
gradients (unison.engine.pace); ``balance="speed"`` deals each epoch's shares and batches by
speed (unison.balance); a round whose strategy allows it closes once enough replicas finished it
(``min_fraction``, ``deadline``), the others skipping to its end step with weight 0; with
``on_failure="continue"`` a replica whose step raised trains on nothing but keeps every collective
(as does, after a relaunch, one whose process died or stalled: ``job.lost``; unison.plan).

The loop never assumes one replica per call: with ``job.stacked`` the replica object holds R
replicas (unison.engine.stacked) whose losses, sample counts and distances are [R] tensors,
and the communicator reduces over them before it talks to the other workers.
"""

from __future__ import annotations

import copy
import math
import time
import traceback
import warnings

import torch
from torch import nn

from ..balance import balanced_indices, balanced_sizes
from ..comm.base import Communicator, uncounted
from ..comm.stacked import StackedComm
from ..errors import UnisonError, WorkerDropped, WorkerError
from ..history import History
from . import asynchronous
from .checkpointer import Checkpointer
from .guard import GOOD, ROLLED_BACK, NonFiniteGuard
from .job import Job, Outcome
from .pace import Pace, paced
from .records import RoundLog
from .replica import Replica
from .stacked import StackedReplica

Validation = tuple[torch.Tensor, torch.Tensor, str]


def run(job: Job, comm: Communicator, device: torch.device | None = None) -> Outcome:
    """Train this worker's replica(s) to the end; every worker of a run calls this with its
    communicator. An exception from the model, the loss or the optimizer comes back as a
    WorkerError naming this replica, the step and the shapes involved (its ``cause`` holds
    the traceback)."""
    device = device or torch.device("cpu")
    if job.stacked:
        comm = StackedComm(job.replicas_per_worker, comm)
    replica = None
    try:
        validation = None
        if job.data.x_val is not None:
            validation = (job.data.x_val.to(device), job.data.y_val.to(device), job.data.task)
        replica = build_replica(job, comm, device, validation)
        if job.strategy.asynchronous:  # a server and workers on their own time (fedbuff)
            return asynchronous.run(job, comm, replica, validation)
        return _Training(job, comm, replica, device, validation).run()
    except UnisonError:
        raise
    except Exception as exc:
        raise _step_failure(exc, comm.rank, replica) from exc


def build_replica(job: Job, comm: Communicator, device: torch.device,
                  validation: Validation | None) -> Replica | StackedReplica:
    """This worker's replica(s): copies of the start model made identical on every rank by a
    broadcast from rank 0, or, for a strategy that shares one model, the start model's storage."""
    if job.stacked:
        replica = StackedReplica(job.model, comm.replicas, job.loss_fn, device, job.optimizer,
                                 penalty=job.penalty, constraint=job.constraint, schedule=job.schedule,
                                 rank=comm.rank, validation=validation)
        tensors = list(replica.params.values()) + list(replica.buffers.values())
    else:
        model = copy.deepcopy(job.model).to(device)  # threads share job.model: never train it in place
        if job.strategy.shares_model:
            _share_storage(model, job.model)
        replica = Replica(model, job.optimizer.build(model.parameters()), job.loss_fn, device,
                          penalty=job.penalty, constraint=job.constraint, schedule=job.schedule,
                          validation=validation, rank=comm.rank)
        tensors = [] if job.strategy.shares_model else list(model.parameters()) + list(model.buffers())
    with torch.no_grad():  # identical starts by construction, whatever each rank built
        for tensor in tensors:
            comm.broadcast(tensor, src=0)
    return replica


class _Training:
    """One worker's run, from its first step to its outcome."""

    def __init__(self, job: Job, comm: Communicator, replica, device: torch.device,
                 validation: Validation | None):
        self.job, self.comm, self.replica, self.strategy = job, comm, replica, job.strategy
        data, partition = job.data, job.partition
        self.x, self.y = (data.x, data.y) if device.type == "cpu" else (data.x.to(device), data.y.to(device))
        self.steps_per_epoch = max(math.ceil(size / job.batch_size)
                                   for size in partition.sizes(len(self.x), comm.world_size))
        self.total_steps = self.steps_per_epoch * job.epochs
        self.history = History(job.history_path if comm.rank == 0 else None)
        self.progress = _progress_bar(job, comm.rank)
        self.strategy.begin(replica, comm)
        self.loss_sum = torch.zeros(replica.local_shape, dtype=torch.float64, device=device)
        # Declared speeds: each step's gradients timed and the slowdown waited out (unison.engine.pace).
        self.balanced = job.balance == "speed"
        self.pace = Pace(job.speeds, comm.rank, device) if job.speeds or self.balanced else None
        # Partial rounds (min_fraction < 1): a round closes once its quorum of replicas finished;
        # a straggler then skips to the round's end and takes part in the merge with weight 0.
        self.partial = self.strategy.partial_rounds and comm.world_size > 1
        self.straggling = False
        # on_failure="continue" dropped this worker: its step raised, or it was lost in an earlier launch
        self.failed = comm.rank in job.lost
        self.first_arrival_seen: float | None = None  # (monotonic) when this round's first arrival was seen
        self.last_round_step = 0
        # Reliability: continue from a checkpoint, write them at round ends, and agree on every
        # step whether it was finite (unison.engine.checkpointer, unison.engine.guard).
        self.checkpointer = Checkpointer(job, comm, replica, self.steps_per_epoch)
        self.guard = NonFiniteGuard(job.nan, replica, comm)
        resumed = self.checkpointer.restore(self.guard)
        if resumed is None and self.strategy.needs_start_gradient:  # a resume restores its result
            self.strategy.start_gradient(replica, comm, self.start_gradient())
        self.start_epoch, self.start_index = 0, 0
        samples_seen, wall_offset = 0, 0.0
        if resumed is not None:
            self.last_round_step, samples_seen, wall_offset = resumed.step, resumed.samples_seen, resumed.wall_s
            if job.wall_offset is not None:  # relaunched: the time since fit() began counts already
                wall_offset = job.wall_offset
            self.history.records = list(resumed.history)
            # a worker dropped before the checkpoint stays dropped (its last record names it)
            if resumed.history and comm.rank in resumed.history[-1].get("failed_workers", ()):
                self.failed = True
            if resumed.epoch_end:
                self.start_epoch = resumed.step // self.steps_per_epoch
            else:
                self.start_epoch, self.start_index = divmod(resumed.step - 1, self.steps_per_epoch)
                self.start_index += 1
        self.guard.remember_merged_state()
        # Round records: summed over replicas in one collective per epoch (unison.engine.records).
        self.rounds = RoundLog(replica, comm, self.history, loss_fn=job.loss_fn, validation=validation,
                               steps_per_epoch=self.steps_per_epoch, started=job.started,
                               wall_offset=wall_offset, samples_seen=samples_seen, progress=self.progress,
                               every_round=job.checkpoint is not None or self.strategy.shares_model,
                               simulated=job.speeds is not None, partial=self.partial)

    def run(self) -> Outcome:
        job, replica, strategy = self.job, self.replica, self.strategy
        startup_s = time.time() - job.started
        if self.progress is not None and self.start_epoch:
            self.progress.update(self.start_epoch)
        for epoch in range(self.start_epoch, job.epochs):
            orders, batches = self.deal(epoch, self.epoch_rates(epoch))
            self.rounds.shares = self.epoch_shares if self.balanced else None
            for i in range(self.start_index if epoch == self.start_epoch else 0, self.steps_per_epoch):
                if self.straggling:  # the round closed without this replica: on to its end step
                    replica.step += 1
                else:
                    self.train_step([order[i * b:(i + 1) * b] for order, b in zip(orders, batches)])
                if strategy.round_ends(replica.step, epoch_end=False):
                    self.end_round(epoch_end=False)
                elif self.partial and not self.straggling and not (
                        i == self.steps_per_epoch - 1 and self.round_ends_with_epoch(epoch)):
                    self.straggling = self.round_closed()  # (a replica done with its round is no straggler)
            last_epoch_unmerged = epoch == job.epochs - 1 and self.last_round_step != replica.step
            if strategy.round_ends(replica.step, epoch_end=True) or last_epoch_unmerged:
                self.end_round(epoch_end=True)
            self.rounds.flush()  # the epoch's records, in one collective
            if self.progress is not None:
                self.progress.update(1)
        if self.last_round_step != replica.step:  # resumed after the last epoch's steps, before its merge
            self.end_round(epoch_end=True)
            self.rounds.flush()
        self.checkpointer.finish()
        if self.progress is not None:
            self.progress.close()
        state = {k: v.detach().to("cpu", copy=True) for k, v in replica.model.state_dict().items()}
        return Outcome(state=state, history=self.history.records, startup_s=startup_s)

    def epoch_rates(self, epoch: int) -> list[float] | None:
        """With balance="speed": every worker's rate for sizing this epoch's shares, the same on
        every rank — the declared speeds, or else the samples per second each measured in the
        last epoch (agreed in one small all-reduce; equal in the first epoch, before any)."""
        if not self.balanced:
            return None
        if self.job.speeds is not None:
            return list(self.job.speeds)
        rate = self.pace.take_epoch_rate()
        if epoch == self.start_epoch:
            return [1.0] * self.comm.world_size
        rates = torch.zeros(self.comm.world_size, dtype=torch.float64, device=self.replica.device)
        rates[self.comm.rank] = rate
        with uncounted(self.comm):  # bookkeeping, not the strategy's traffic
            return self.comm.all_reduce_sum(rates).tolist()

    def deal(self, epoch: int, rates: list[float] | None) -> tuple[list[torch.Tensor], list[int]]:
        """This epoch's index list and batch size of each replica this object trains: the
        partition's, or with ``rates`` shard's permutation dealt out by speed (unison.balance)."""
        job, n, world, device = self.job, len(self.x), self.comm.world_size, self.replica.device
        if rates is None:
            return ([job.partition.indices(n, world, r, epoch, job.seed).to(device) for r in self.replica.ranks],
                    [job.batch_size] * len(self.replica.ranks))
        shares, batches = balanced_sizes(n, world, job.batch_size, rates)
        self.epoch_shares = shares
        return ([balanced_indices(n, world, r, epoch, job.seed, shares).to(device) for r in self.replica.ranks],
                [batches[r] for r in self.replica.ranks])

    def start_gradient(self) -> torch.Tensor:
        """This replica's mean gradient (loss + penalty) at the start over its first epoch's
        share, batch by batch in training mode; floating buffers (BatchNorm statistics) are put
        back as they were."""
        replica, job = self.replica, self.job
        buffers = replica.state_vector(parameters=False)
        first = (list(job.speeds) if job.speeds else [1.0] * self.comm.world_size) if self.balanced else None
        orders, batches = self.deal(0, first)
        total = torch.zeros(replica.local_shape + (replica.num_parameters,), device=replica.device)
        samples = torch.zeros(replica.local_shape, device=replica.device)
        for i in range(self.steps_per_epoch):
            _, count = replica.gradients(self.x, self.y, [o[i * b:(i + 1) * b] for o, b in zip(orders, batches)])
            count = torch.as_tensor(count, dtype=total.dtype, device=replica.device)
            total += replica.grad_vector() * count.unsqueeze(-1)
            samples += count
        replica.zero_grad()
        replica.load_state_vector(buffers, parameters=False)
        return total / samples.clamp_min(1).unsqueeze(-1)

    def train_step(self, batches: list[torch.Tensor]) -> None:
        replica, pace = self.replica, self.pace
        if self.failed:  # dropped (on_failure="continue"): no data, weight 0, still in every collective
            batches = [batch[:0] for batch in batches]

        def gradients() -> tuple[torch.Tensor, int]:
            try:
                return replica.gradients(self.x, self.y, batches)
            except Exception as exc:  # noqa: BLE001 - the user's model or loss: any exception is its failure
                if self.job.on_failure != "continue" or isinstance(exc, UnisonError):
                    raise
                return self.drop_this_worker(exc)
        loss, count = paced(pace, gradients)  # the declared slowdown, before the exchange others may wait at
        replica.step += 1
        # stacked replicas give one loss per replica: their sum is finite exactly when all are
        self.guard.before_exchange(loss.sum() if loss.dim() else loss)
        shared = self.strategy.on_gradients(replica, self.comm, replica.step, count)
        verdict = self.guard.check(shared)  # a bad step is handled there (unison.engine.guard)
        if verdict == GOOD:
            replica.optimizer_step(self.steps_per_epoch, self.total_steps, shared=shared, samples=count)
            self.loss_sum += loss * count
            replica.samples_since_merge += count
        elif verdict == ROLLED_BACK:
            self.loss_sum.zero_()

    def round_ends_with_epoch(self, epoch: int) -> bool:
        """Whether the round under way ends at this epoch's end (every="epoch", or the last one)."""
        return self.strategy.round_ends(self.replica.step, epoch_end=True) or epoch == self.job.epochs - 1

    def closes_early(self, step: int) -> bool:
        """Whether the round of global step ``step`` may close before every replica finished it."""
        world = self.comm.world_size
        return self.strategy.quorum(world, step) < world or self.strategy.deadline_at(step) is not None

    def round_closed(self) -> bool:
        """Whether this round closes without this replica: its quorum finished it, or its
        deadline passed since this replica first saw that another one had."""
        step = self.replica.step + 1
        if not self.closes_early(step):
            return False
        arrived = self.comm.arrivals(str(self.last_round_step))
        if arrived >= self.strategy.quorum(self.comm.world_size, step):
            return True
        deadline = self.strategy.deadline_at(step)
        if deadline is None or not arrived:
            return False
        now = time.monotonic()
        if self.first_arrival_seen is None:
            self.first_arrival_seen = now
        return now - self.first_arrival_seen >= deadline

    def drop_this_worker(self, exc: Exception) -> tuple[torch.Tensor, int]:
        """on_failure="continue": warn, leave this replica's round out and train on nothing from
        now on; it keeps making every collective (as a replica whose share is used up does), so
        the others go on. Returns the failed step's (loss, samples): (0, 0)."""
        replica = self.replica
        message = str(_step_failure(exc, self.comm.rank, replica))
        warnings.warn(f"{message}; on_failure='continue': worker {self.comm.rank} is dropped and the run goes "
                      "on with the others", WorkerDropped, stacklevel=2)
        self.failed = True
        replica.in_forward = False
        replica.zero_grad()
        replica.samples_since_merge = 0
        self.loss_sum.zero_()
        return torch.zeros((), device=replica.device), 0

    def end_round(self, epoch_end: bool) -> None:
        replica, guard = self.replica, self.guard
        dropped, self.straggling, self.first_arrival_seen = self.straggling, False, None
        if self.partial and not dropped and not self.failed and self.closes_early(replica.step):
            self.comm.arrive(str(self.last_round_step))  # first, so that stragglers stop at once
        if dropped:  # FedAvg's partial participation: a straggler's round is left out of the merge
            replica.samples_since_merge = 0
            self.loss_sum.zero_()
        if guard.rolled_back_at_round_end():  # a local step was not finite: undo the round
            self.loss_sum.zero_()
            self.last_round_step = replica.step
            return
        # the merge's weight is the round's samples
        round_samples = torch.as_tensor(replica.samples_since_merge, dtype=torch.float64, device=replica.device)
        distance = self.strategy.merge_replicas(replica, self.comm)
        replica.project()  # a robust merge need not stay inside the constraint set
        self.rounds.add(loss_sum=self.loss_sum.clone(), samples=round_samples, distance=distance,
                        discarded=guard.discarded, rollbacks=guard.rollbacks,
                        wait_s=self.pace.take_round_wait() if self.pace is not None else 0.0, dropped=dropped,
                        failed=self.failed)
        self.loss_sum.zero_()
        replica.samples_since_merge = 0
        self.last_round_step = replica.step
        guard.remember_merged_state()
        self.checkpointer.round_ended(epoch_end=epoch_end, samples_seen=self.rounds.samples_seen,
                                      history=self.history.records, guard=guard)


def _step_failure(exc: Exception, rank: int, replica) -> WorkerError:
    if replica is None:
        return WorkerError(f"worker {rank} failed before training: {type(exc).__name__}: {exc}",
                           rank=rank, cause=traceback.format_exc())
    shapes = ""
    in_forward = replica.in_forward
    if in_forward and isinstance(replica.last_output, torch.Tensor):  # the loss failed
        shapes = (f" (model output of shape {tuple(replica.last_output.shape)}, "
                  f"targets of shape {tuple(replica.last_target.shape)})")
    return WorkerError(f"worker {rank} failed at step {replica.step + in_forward}{shapes}: "
                       f"{type(exc).__name__}: {exc}", rank=rank, cause=traceback.format_exc())


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


def _progress_bar(job: Job, rank: int):
    if not job.progress or rank != 0:
        return None
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI, pipes).
    return tqdm(total=job.epochs, unit="epoch", desc=job.strategy.spec(), leave=False, disable=None)
