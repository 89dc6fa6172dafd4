"""What every launcher shares: the bootstrap of a worker and the routine that blames a failure.

A worker sets its intra-op threads and its seed and runs the one loop (unison.engine.loop); a
launcher that watched its workers fail hands the failures to ``blame``, which names the worker
that caused them rather than the peers that only noticed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..comm.base import Communicator, PeerFailed, Solo
from ..engine import loop
from ..engine.job import Job, Outcome
from ..errors import UnisonError, WorkerError
from .base import threads_per_worker


def in_this_process(job: Job, device: torch.device | None = None) -> Outcome:
    """One worker, in this process, with every core: the caller's RNG is left as it was."""
    device = device or torch.device("cpu")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads_per_worker(1))  # one computation, not N competing ones
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(job.seed)
            return loop.run(job, Solo(), device)
    finally:
        torch.set_num_threads(previous)


def own_process(job: Job, comm: Communicator, local_workers: int, device: torch.device | None = None) -> Outcome:
    """A worker that is a process of its own (processes, torchrun): its share of the cores,
    its own seed, the loop."""
    torch.set_num_threads(threads_per_worker(local_workers))
    torch.manual_seed(job.seed + comm.rank)
    return loop.run(job, comm, device)


@dataclass
class Failure:
    """What a launcher learnt of one worker's failure."""

    rank: int
    cause: str                              # a traceback, or how the worker exited
    exception: BaseException | None = None  # the exception itself, where it could be had
    symptom: bool = False                   # a collective failed because a peer did (PeerFailed)
    signalled: bool = False                 # killed by a signal: a cause, never a symptom
    died: bool = False                      # it exited (code or signal) without reporting an error

    @property
    def summary(self) -> str:
        return (self.cause.strip().splitlines() or ["failed"])[-1]


NAMED_GRACE_S = 0.5  # after a timeout that names a missing rank: its own report, already sent, may lag
SYMPTOM_GRACE_S = 2.0  # after symptoms that name nobody: how long the cause may take to arrive


def blame(failures: list[Failure], silent: list[int], waited_s: float) -> BaseException | None:
    """The error to raise for these failures, or None while the cause may still arrive.

    Peers of a failed worker fail too ("connection closed", a timeout): those are symptoms. A
    cause wins (a signal first). With symptoms only, ``waited_s`` after the first: a timeout that
    names the ranks that did not arrive once NAMED_GRACE_S has passed (a missing rank that raised
    did so before its peers' timeout, so its report is on its way), then, after SYMPTOM_GRACE_S,
    a worker still running that reported nothing (``silent``), else the first symptom. The
    trade-off: a rank that was slow past the timeout and then failed (an out-of-memory kill
    after swapping) is named rightly but as lost, with the timeout, when its own report comes
    later than NAMED_GRACE_S. ``waited_s`` counts from the first failure of any kind.
    """
    causes = sorted((f for f in failures if not f.symptom), key=lambda f: not f.signalled)
    if causes:
        return _error(causes[0])
    named = next((f for f in failures if getattr(f.exception, "missing", ())), None)
    if named is not None and waited_s >= NAMED_GRACE_S:
        rank = named.exception.missing[0]
        return WorkerError(f"worker {rank} failed: {named.exception}", rank=rank, cause=named.cause, lost=True)
    if waited_s < SYMPTOM_GRACE_S or not failures:
        return None
    if silent:
        first = failures[0]
        symptom = first.exception or first.summary
        return WorkerError(f"worker {silent[0]} failed: it reported nothing while its peers' collectives "
                           f"failed ({symptom})", rank=silent[0], cause=first.cause, lost=True)
    return _error(failures[0])


def _error(failure: Failure) -> BaseException:
    exception = failure.exception
    if isinstance(exception, UnisonError) and not isinstance(exception, PeerFailed):
        return exception
    # An exit without a report (an exit code or a signal): the worker is lost, not wrong.
    return WorkerError(f"worker {failure.rank} failed: {failure.summary}", rank=failure.rank, cause=failure.cause,
                       lost=failure.died)
