"""Backend "threads": N threads in this process, collectives through shared memory.

A thread cannot be stopped from outside: once one worker fails, the others are woken (their
collectives raise PeerFailed) and waited for a few seconds; a worker stuck outside any
collective is left behind as a daemon thread rather than hanging fit().
"""

from __future__ import annotations

import threading
import time
import traceback

import torch

from ..comm.base import PeerFailed
from ..comm.threads import ThreadComm, ThreadGroup
from ..engine import loop
from ..engine.job import Job, Outcome
from ..strategies.base import POINT_TO_POINT, SHARED_MEMORY
from .base import Backend, threads_per_worker
from .worker import Failure, blame, in_this_process

GRACE_S = 3.0  # how long the other workers may take to stop once one has failed


class Threads(Backend):
    name = "threads"
    offers = frozenset({SHARED_MEMORY, POINT_TO_POINT})

    def launch(self, job: Job) -> Outcome:
        if job.workers == 1:
            return in_this_process(job)
        # intra-op threads are process-wide: split the cores among the workers for the run.
        previous = torch.get_num_threads()
        torch.set_num_threads(threads_per_worker(job.workers))
        try:
            with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
                # One global generator serves all threads, so dropout draws are not reproducible
                # across runs when several threads draw from it at once.
                torch.manual_seed(job.seed)
                return _launch_threads(job)
        finally:
            torch.set_num_threads(previous)


BACKEND = Threads()


def _launch_threads(job: Job) -> Outcome:
    group = ThreadGroup(job.workers, job.timeout)
    outcomes: list[Outcome | None] = [None] * job.workers
    failures: list[Failure] = []

    def work(rank: int) -> None:
        try:
            outcomes[rank] = loop.run(job, ThreadComm(group, rank))
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            failures.append(Failure(rank, traceback.format_exc(), exc, symptom=isinstance(exc, PeerFailed)))
            group.abort()  # wake the others instead of leaving them waiting for this one

    workers = [threading.Thread(target=work, args=(rank,), name=f"unison-worker-{rank}", daemon=True)
               for rank in range(job.workers)]
    for worker in workers:
        worker.start()
    for worker in workers:
        while worker.is_alive() and not failures:
            worker.join(0.1)
    if failures:
        deadline = time.monotonic() + GRACE_S
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        silent = [rank for rank, worker in enumerate(workers) if worker.is_alive()]
        raise blame(list(failures), silent, waited_s=float("inf"))
    return outcomes[0]
