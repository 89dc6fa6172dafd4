"""Checkpoints inside the training loop: when a round end writes one, what each replica
contributes, and how a run continues from one so that it ends exactly as if never stopped.

Checkpoints are taken at round ends, after the merge: the model is then the merged one on
every replica, and a round's sums are empty. Each replica contributes what is its own: its
optimizer state (momentum, Adam's moments and step, the learning rate), its integer buffers,
its RNG states, its bytes-sent count, its non-finite counters and whatever tensors the strategy
keeps in ``replica.strategy_state``. They travel to rank 0 as safetensors bytes (one
all-gather), and rank 0 alone writes the files (unison.checkpoint), as torch distributed
checkpoint has one coordinator write the metadata. Data order needs nothing: every replica
recomputes its indices from (seed, epoch, rank).
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save as save_tensors

from .. import checkpoint as files
from ..comm.base import uncounted

if TYPE_CHECKING:
    from ..comm.base import Communicator
    from ..data import TrainData
    from .guard import NonFiniteGuard
    from .job import Job
    from .view import ReplicaView

_OPTIMIZER, _BUFFER, _RNG, _STRATEGY = "optimizer/", "buffer/", "rng/", "strategy/"


@dataclass
class Resumed:
    """Where the loop continues: after ``step``, with the epoch-end round already done or not."""

    step: int
    epoch_end: bool
    samples_seen: int
    history: list[dict[str, Any]]
    wall_s: float


def data_fingerprint(data: "TrainData") -> str:
    """SHA-256 of the training tensors: a resumed run must see the same samples."""
    digest = hashlib.sha256()
    for tensor in (data.x, data.y):
        digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Checkpointer:
    """Every rank holds one; rank 0 writes. ``round_ended`` is called after each merge."""

    def __init__(self, job: "Job", comm: "Communicator", replica: "ReplicaView", steps_per_epoch: int):
        self.job, self.comm, self.replica, self.steps_per_epoch = job, comm, replica, steps_per_epoch
        settings = job.checkpoint
        self.directory = settings.directory if settings else None
        self.kind, self.every = (settings.kind, settings.every) if settings else ("", 0.0)
        self.rounds = 0
        self.saved_step = -1
        self._latest: dict[str, Any] = {}
        self.last_saved = time.monotonic()
        self._fingerprint: str | None = None

    # ---- continuing from a checkpoint ----------------------------------------------------

    def restore(self, guard: "NonFiniteGuard") -> Resumed | None:
        """Load this replica's share of ``job.resume`` (if any); where the loop continues."""
        checkpoint = self.job.resume
        if checkpoint is None:
            return None
        replica, rank = self.replica, self.comm.rank
        tensors, meta = checkpoint.replicas[rank], checkpoint.replica_meta[rank]
        replica.model.load_state_dict(checkpoint.model)
        with torch.no_grad():
            for name, buffer in replica.model.named_buffers():
                if _BUFFER + name in tensors:
                    buffer.copy_(tensors[_BUFFER + name])
        replica.optimizer.load_state_dict(files.unflatten_optimizer(tensors, meta["optimizer"], _OPTIMIZER))
        torch.set_rng_state(tensors[_RNG + "cpu"])
        if replica.device.type == "cuda" and _RNG + "cuda" in tensors:
            torch.cuda.set_rng_state(tensors[_RNG + "cuda"], replica.device)
        for key, value in tensors.items():
            if key.startswith(_STRATEGY):
                replica.strategy_state[key[len(_STRATEGY):]] = value.to(replica.device)
        self.comm.bytes_sent = int(meta["bytes_sent"])
        state = checkpoint.state
        replica.step, replica.samples_since_merge = checkpoint.step, 0
        guard.load_state(meta["nan"])
        self.rounds, self.saved_step = int(state["rounds"]), checkpoint.step
        history = state["history"]
        return Resumed(step=checkpoint.step, epoch_end=bool(state["epoch_end"]),
                       samples_seen=int(state["samples_seen"]), history=history,
                       wall_s=float(history[-1]["wall_s"]) if history else 0.0)

    # ---- writing one ---------------------------------------------------------------------

    def round_ended(self, *, epoch_end: bool, samples_seen: int, history: list[dict[str, Any]],
                    guard: "NonFiniteGuard") -> None:
        if not self.directory:
            return
        self.rounds += 1
        self._latest = dict(epoch_end=epoch_end, samples_seen=samples_seen, history=history, guard=guard)
        if self._due():
            self._save(**self._latest)

    def finish(self) -> None:
        """Training is over: its last round end is checkpointed too, so that a finished run can
        be continued with more epochs."""
        if self.directory and self._latest and self.saved_step != self.replica.step:
            self._save(**(self._latest | {"epoch_end": True}))

    def _due(self) -> bool:
        if self.kind == "rounds":
            return self.rounds % int(self.every) == 0
        # A duration: rank 0's clock decides, and tells the others (clocks differ by a little).
        flag = torch.tensor([float(time.monotonic() - self.last_saved >= self.every)], device=self.replica.device)
        with uncounted(self.comm):
            self.comm.broadcast(flag, src=0)
        return bool(flag.item())

    def _save(self, *, epoch_end: bool, samples_seen: int, history: list[dict[str, Any]],
              guard: "NonFiniteGuard") -> None:
        replica, comm = self.replica, self.comm
        # From the gather on, a peer may fail at its next step and the launcher end this
        # worker: the writer finishes the checkpoint first (SIGTERM waits; SIGKILL follows
        # after the launcher's grace period), so that it is there to resume from.
        with _termination_deferred(comm.rank == 0):
            with uncounted(comm):
                blobs = gather_bytes(comm, self._replica_bytes(guard), replica.device)
            self.last_saved, self.saved_step = time.monotonic(), replica.step
            if comm.rank != 0:
                return
            if self._fingerprint is None:
                self._fingerprint = data_fingerprint(self.job.data)
            state = {"world_size": comm.world_size, "steps_per_epoch": self.steps_per_epoch,
                     "epoch_end": epoch_end, "samples_seen": samples_seen, "rounds": self.rounds,
                     "history": history, "config": self.job.checkpoint.record,
                     "data": self._fingerprint}
            files.save(self.directory, replica.step, state, replica.model.state_dict(), blobs,
                       keep=self.job.checkpoint.keep)

    def _replica_bytes(self, guard: "NonFiniteGuard") -> bytes:
        """This replica's own state as safetensors bytes; JSON parts in its metadata."""
        replica = self.replica
        tensors, optimizer_meta = files.flatten_optimizer(replica.optimizer.state_dict(), _OPTIMIZER)
        for name, buffer in replica.model.named_buffers():
            if not buffer.is_floating_point():  # floating buffers are merged, the others are not
                tensors[_BUFFER + name] = buffer.detach().cpu().clone()
        tensors[_RNG + "cpu"] = torch.get_rng_state()
        if replica.device.type == "cuda":
            tensors[_RNG + "cuda"] = torch.cuda.get_rng_state(replica.device)
        for name, value in replica.strategy_state.items():
            tensors[_STRATEGY + name] = value.detach().to("cpu", copy=True)
        meta = {"optimizer": optimizer_meta, "bytes_sent": self.comm.bytes_sent, "nan": guard.state()}
        return save_tensors(tensors, metadata={files.REPLICA_META: json.dumps(meta)})


@contextmanager
def _termination_deferred(writer: bool):
    """Block SIGTERM in this thread while the writer saves; a pending one arrives after."""
    if not writer or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def gather_bytes(comm: "Communicator", blob: bytes, device: torch.device) -> list[bytes]:
    """Every rank's ``blob``, in rank order (two all-gathers: the lengths, then the padded bytes)."""
    if comm.world_size == 1:
        return [blob]
    length = torch.tensor([len(blob)], dtype=torch.int64, device=device)
    lengths = [int(n) for n in comm.all_gather(length)]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[:len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return [part[:n].cpu().numpy().tobytes() for part, n in zip(comm.all_gather(padded), lengths)]
