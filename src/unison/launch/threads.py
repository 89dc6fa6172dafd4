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

from ..comm.base import PeerFailed, Solo
from ..comm.threads import ThreadComm, ThreadGroup
from ..errors import UnisonError, WorkerError
from ..replica import Job, Outcome, run
from . import threads_per_worker

GRACE_S = 3.0  # how long the other workers may take to stop once one has failed


def launch(job: Job, world_size: int) -> Outcome:
    """Run ``world_size`` replicas as threads; re-raise the first worker's failure."""
    # intra-op threads are process-wide: split the cores among the workers for the run.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads_per_worker(world_size))
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
            # One global generator serves all threads, so dropout draws are not reproducible
            # across runs when several threads draw from it at once.
            torch.manual_seed(job.config.seed)
            if world_size == 1:
                return run(job, Solo())
            return _launch_threads(job, world_size)
    finally:
        torch.set_num_threads(previous)


def _launch_threads(job: Job, world_size: int) -> Outcome:
    group = ThreadGroup(world_size, job.config.timeout)
    outcomes: list[Outcome | None] = [None] * world_size
    failures: list[tuple[int, BaseException, str]] = []

    def work(rank: int) -> None:
        try:
            outcomes[rank] = run(job, ThreadComm(group, rank))
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            failures.append((rank, exc, traceback.format_exc()))
            group.abort()  # wake the others instead of leaving them waiting for this one

    workers = [threading.Thread(target=work, args=(rank,), name=f"unison-worker-{rank}", daemon=True)
               for rank in range(world_size)]
    for worker in workers:
        worker.start()
    for worker in workers:
        while worker.is_alive() and not failures:
            worker.join(0.1)
    if failures:
        deadline = time.monotonic() + GRACE_S
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        # Report the worker that failed first, not the peers it woke up.
        rank, exc, trace = next((f for f in failures if not isinstance(f[1], PeerFailed)), failures[0])
        if isinstance(exc, UnisonError) and not isinstance(exc, PeerFailed):
            raise exc
        missing = next((f[1].missing for f in failures if getattr(f[1], "missing", ())), ())
        if missing:  # nobody failed: some worker stopped taking part in the collectives
            raise WorkerError(f"worker {missing[0]} failed: {exc}", rank=missing[0], cause=trace) from exc
        raise WorkerError(f"worker {rank} failed: {type(exc).__name__}: {exc}", rank=rank,
                          cause=trace) from exc
    return outcomes[0]
