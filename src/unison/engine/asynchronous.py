"""The asynchronous loop: server ranks and workers that never wait for each other (fedbuff).

The loop (unison.engine.loop) makes every rank take the same collectives in the same order; an
asynchronous strategy (``Strategy.asynchronous``) runs here instead, after the same common
start. Its first ``strategy.servers`` ranks serve; the others are workers 0..N−1 (rank minus
the servers), each with its share of the data as partitioned among N.

A worker trains its local steps and, after each step the strategy names (``sends``), sends one
message to the server: [meta, change], meta = (server version it started from, samples,
summed loss, its step count, last?, lr) as float64, change = θ_received − θ_local (parameters,
then floating buffers). It then receives [model, version] and continues from that model.

The server takes the messages as they come (Communicator.recv from any worker; with
``replay``, in the given order), buffers them and applies the strategy's update; it answers
each arrival with its current model. It writes one history record per server step, with the
round's ``arrivals`` ([worker, version started from, staleness]); at the end every rank gets
the server's final model (one broadcast), which is the run's model.
Given the order of arrivals the run is determined, so replaying that order reproduces it.

What this loop does not do (the plan refuses them up front): nan='skip'/'rollback' (a worker
stops at a non-finite loss or change), checkpoints, stacked replicas. A worker that has sent
its last change waits for the others in that final broadcast, whose wait is the run's
``timeout``: it must exceed the time between the first and the last worker finishing.
"""

from __future__ import annotations

import math
import time

import torch

from ..comm.base import Communicator, PeerFailed, nbytes, uncounted
from ..errors import NonFiniteError
from ..history import History
from .job import Job, Outcome
from .pace import Pace, paced
from .records import evaluate
from .replica import Replica

SERVER = 0
VERSION, SAMPLES, LOSS, STEP, FINAL, LR = range(6)  # a worker's meta, float64
META = 6


def run(job: Job, comm: Communicator, replica: Replica,
        validation: tuple[torch.Tensor, torch.Tensor, str] | None) -> Outcome:
    """This rank's part of an asynchronous run: serve (rank 0) or work."""
    if comm.rank < job.strategy.servers:
        return _Server(job, comm, replica, validation).run()
    return _work(job, comm, replica)


def _shares(job: Job, comm: Communicator) -> tuple[int, list[int]]:
    workers = comm.world_size - job.strategy.servers
    return workers, job.partition.sizes(len(job.data.x), workers)


def _work(job: Job, comm: Communicator, replica: Replica) -> Outcome:
    strategy, device, b = job.strategy, replica.device, job.batch_size
    workers, shares = _shares(job, comm)
    me = comm.rank - strategy.servers
    x, y = (job.data.x, job.data.y) if device.type == "cpu" else (job.data.x.to(device), job.data.y.to(device))
    steps_per_epoch = math.ceil(shares[me] / b)
    total = steps_per_epoch * job.epochs
    sends = set(strategy.sends(steps_per_epoch, job.epochs))
    start = replica.state_vector()
    reply, reply_meta = torch.empty_like(start), torch.zeros(1, dtype=torch.float64, device=device)
    version, loss_sum, samples = 0, torch.zeros((), dtype=torch.float64, device=device), 0
    pace = Pace(job.speeds, me, device) if job.speeds else None  # declared speeds (unison.engine.pace)
    startup_s = time.time() - job.started

    def exchange() -> None:
        nonlocal start, version, samples
        change = start - replica.state_vector()
        if not torch.isfinite(change).all():
            raise NonFiniteError(f"step {replica.step} is not finite (replica {me}: its change since the last "
                                 "model it received); nan='stop' ended the run", rank=comm.rank, step=replica.step,
                                 replicas=(me,))
        meta = torch.tensor([version, samples, 0.0, replica.step, replica.step == total,
                             replica.optimizer.param_groups[0]["lr"]], dtype=torch.float64, device=device)
        meta[LOSS] = loss_sum
        comm.send([meta, change], dst=SERVER)
        comm.recv([reply, reply_meta], src=SERVER)
        replica.load_state_vector(reply)
        start, version = reply.clone(), int(reply_meta[0])
        loss_sum.zero_()
        samples = 0

    if total == 0:  # no data: one empty change, so the server knows this worker is done
        exchange()
    for epoch in range(job.epochs):
        order = job.partition.indices(len(x), workers, me, epoch, job.seed).to(device)
        for i in range(steps_per_epoch):
            if comm.peer_failed():
                raise PeerFailed("another worker failed", rank=comm.rank)
            loss, count = paced(pace, lambda: replica.gradients(x, y, [order[i * b:(i + 1) * b]]))
            replica.step += 1
            if not torch.isfinite(loss):
                raise NonFiniteError(f"step {replica.step} is not finite (replica {me}: the loss is {loss.item()}); "
                                     "nan='stop' ended the run", rank=comm.rank, step=replica.step, replicas=(me,))
            replica.optimizer_step(steps_per_epoch, total, samples=count)
            loss_sum += loss.double() * count
            samples += count
            if replica.step in sends:
                exchange()
    return Outcome(state=_final_state(comm, replica), history=[], startup_s=startup_s)


def _final_state(comm: Communicator, replica: Replica) -> dict[str, torch.Tensor]:
    """The server's final model on every rank (one broadcast, made by all once the server is
    done), as the loop leaves the merged model on every rank."""
    state = replica.state_vector()
    with uncounted(comm):  # after the last record: not part of the training's traffic
        comm.broadcast(state, src=SERVER)
    replica.load_state_vector(state)
    return {k: v.detach().to("cpu", copy=True) for k, v in replica.model.state_dict().items()}


class _Server:
    """Rank 0: the model, the buffer and the history. A record's ``divergence`` is the mean
    distance of the buffered changes (parameters) to their mean; ``step`` the workers' mean
    step count; ``comm_bytes`` what a worker sent on average, ``server_bytes`` the server."""

    def __init__(self, job: Job, comm: Communicator, replica: Replica,
                 validation: tuple[torch.Tensor, torch.Tensor, str] | None):
        self.job, self.comm, self.replica, self.strategy = job, comm, replica, job.strategy
        self.validation = validation
        self.history = History(job.history_path)
        self.workers, shares = _shares(job, comm)
        self.samples_per_epoch = max(sum(shares), 1)
        self.n = replica.num_parameters
        self.theta = replica.state_vector()[:self.n].clone()
        self.optimizer = self.strategy.server_optimizer(self.theta)
        self.version = 0
        self.changes: list[torch.Tensor] = []
        self.staleness: list[int] = []
        self.arrivals: list[list[int]] = []
        self.steps = [0] * self.workers        # each worker's steps so far
        self.samples = 0                       # all workers', so far
        self.worker_bytes = 0                  # what the workers sent, so far
        self.recorded_up = 0                   # worker_bytes at the last record
        self.round_loss, self.round_samples, self.lr = 0.0, 0, 0.0
        self.progress = None
        if job.progress:  # epochs done, as the server counts samples; none when stderr is no terminal
            from tqdm.auto import tqdm

            self.progress = tqdm(total=job.epochs, unit="epoch", desc=job.strategy.spec(), leave=False, disable=None)

    def run(self) -> Outcome:
        startup_s = time.time() - self.job.started
        comm, replica, servers = self.comm, self.replica, self.strategy.servers
        meta = torch.empty(META, dtype=torch.float64, device=replica.device)
        change = torch.empty_like(replica.state_vector())
        answer = torch.zeros(1, dtype=torch.float64, device=replica.device)
        working = set(range(servers, comm.world_size))
        replay = iter(self.strategy.replay) if self.strategy.replay is not None else None
        comm.traffic.take()  # the start's broadcast is start-up's, as the loop counts it
        while working:
            source = next(replay) + servers if replay is not None else tuple(sorted(working))
            sender = comm.recv([meta, change], src=source)
            self.arrive(sender - servers, meta.tolist(), change)
            self.worker_bytes += nbytes(meta) + nbytes(change)
            if meta[FINAL]:
                working.discard(sender)
            if len(self.changes) == self.strategy.buffer:
                self.step(full=True)
            answer[0] = self.version
            comm.send([replica.state_vector(), answer], dst=sender)
        if self.changes:  # the last, partly filled buffer
            self.step(full=False)
        if self.progress is not None:
            self.progress.close()
        return Outcome(state=_final_state(comm, replica), history=self.history.records, startup_s=startup_s)

    def arrive(self, worker: int, meta: list[float], change: torch.Tensor) -> None:
        started = int(meta[VERSION])
        staleness = self.version - started
        self.changes.append(change.clone())
        self.staleness.append(staleness)
        self.arrivals.append([worker, started, staleness])
        self.steps[worker] = int(meta[STEP])
        self.samples += int(meta[SAMPLES])
        self.round_samples += int(meta[SAMPLES])
        self.round_loss += meta[LOSS]
        self.lr = meta[LR]

    @torch.no_grad()
    def step(self, full: bool) -> None:
        """Apply the buffer: the server optimizer on θ with Δ̄ as gradient, buffers θ − Δ̄."""
        replica, n = self.replica, self.n
        delta = self.strategy.buffered(self.changes, self.staleness, full)
        with torch.enable_grad():
            self.theta.grad = delta[:n].clone()
            self.optimizer.step()
        self.theta.grad = None
        state = replica.state_vector()
        state[:n] = self.theta
        state[n:] -= delta[n:]
        replica.load_state_vector(state)
        replica.project()  # projected server step: θ stays inside the constraint set
        self.theta.copy_(replica.state_vector()[:n])
        self.version += 1
        self.record()

    def record(self) -> None:
        changes = torch.stack([c[:self.n] for c in self.changes])
        spread = torch.linalg.vector_norm(changes - changes.mean(dim=0), dim=1).mean().item() if self.n else 0.0
        record = {"epoch": round(self.samples / self.samples_per_epoch, 4), "step": sum(self.steps) // self.workers,
                  "wall_s": time.time() - self.job.started, "samples": self.samples,
                  "train_loss": self.round_loss / max(self.round_samples, 1), "divergence": spread,
                  "comm_bytes": self.worker_bytes // self.workers, "server_bytes": self.comm.bytes_sent,
                  "lr": self.lr, "version": self.version, "arrivals": list(self.arrivals)}
        # for unison.linkmodel: the messages since the last record, up (the workers' changes) and
        # down (the server's replies: its sends), and the server's seconds inside communication
        traffic = self.comm.traffic.take()
        down = traffic["collectives"].get("send", [0, 0])
        record |= {"comm_s": traffic["comm_s"],
                   "messages": {"up": [len(self.arrivals), self.worker_bytes - self.recorded_up],
                                "down": [int(down[0]), int(down[1])]}}
        self.recorded_up = self.worker_bytes
        if self.validation is not None:
            x, y, task = self.validation
            record |= evaluate(self.replica.model, x, y, self.job.loss_fn, task)
        self.history.append(record)
        if self.progress is not None:
            self.progress.update(min(record["epoch"], self.job.epochs) - self.progress.n)
            self.progress.set_postfix({k: f"{record[k]:.4g}" for k in ("train_loss", "val_acc") if k in record})
        self.changes, self.staleness, self.arrivals = [], [], []
        self.round_loss, self.round_samples = 0.0, 0
