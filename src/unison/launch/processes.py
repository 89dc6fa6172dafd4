"""Backend "processes": N spawned processes on this machine, gloo over 127.0.0.1.

The data set is moved to shared memory once and every worker maps it; nothing is copied per
worker. The launcher watches every worker: if one dies or raises, the others are ended and
fit() raises WorkerError naming the rank and its exit code, signal or traceback.
"""

from __future__ import annotations

import io
import multiprocessing
import pickle
import signal
import traceback
from multiprocessing.connection import wait

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..comm import torch_dist
from ..errors import ConfigError, UnisonError, WorkerError
from ..replica import Job, Outcome, run
from . import threads as threads_backend
from . import threads_per_worker

GRACE_S = 3.0  # how long a worker may take to stop when asked before it is killed


def launch(job: Job, world_size: int) -> Outcome:
    if world_size == 1:  # one worker needs no process of its own, nor its start-up time
        return threads_backend.launch(job, 1)
    job.data.share_memory_()
    store = torch_dist.host_store(world_size, job.config.timeout)
    context = torch.multiprocessing.get_context("spawn")
    pipes, workers = [], []
    try:
        for rank in range(world_size):
            receiver, sender = context.Pipe(duplex=False)
            worker = context.Process(target=_work, args=(rank, world_size, store.port, job, sender),
                                     name=f"unison-worker-{rank}", daemon=True)
            try:
                worker.start()
            except (pickle.PicklingError, AttributeError, TypeError) as exc:
                raise ConfigError(f"cannot send the run to worker processes ({exc}); define the "
                                  "model, loss and optimizer at module level, or use backend='threads'") from None
            sender.close()  # the child holds its own end; EOF then means the child is gone
            pipes.append(receiver)
            workers.append(worker)
        return _supervise(workers, pipes)
    finally:
        _stop(workers)
        del store


def _supervise(workers, pipes) -> Outcome:
    """Wait for rank 0's outcome and every clean exit; fail fast on the first failure."""
    outcome: dict | None = None
    running, closed = set(range(len(workers))), set()
    while running:
        ready = wait([pipes[r] for r in running - closed] + [workers[r].sentinel for r in running])
        failures = []  # (rank, cause, exception, killed by a signal)
        for rank in sorted(running):
            exited = workers[rank].sentinel in ready
            if exited or pipes[rank] in ready:
                while rank not in closed and (exited or pipes[rank].poll()):
                    try:  # an exited worker's pipe is drained to EOF: its last words come first
                        kind, *body = pipes[rank].recv()
                    except EOFError:
                        closed.add(rank)
                        break
                    if kind == "done":
                        outcome = body[0]
                    else:
                        failures.append((rank, body[0], body[1], False))
                    if not exited:
                        break
            if exited:
                workers[rank].join()
                code = workers[rank].exitcode
                if code != 0 and not any(f[0] == rank for f in failures):
                    failures.append((rank, _describe_exit(code), None, code < 0))
                running.discard(rank)
        if failures:
            # Peers of a killed worker fail too ("connection closed"); blame the killed one.
            rank, cause, exception, _ = sorted(failures, key=lambda f: not f[3])[0]
            _fail(workers, rank, cause, exception)
    if outcome is None:
        raise WorkerError("worker 0 exited without sending the trained model", rank=0)
    return Outcome(state=load_tensors(outcome["state"]), history=outcome["history"],
                   startup_s=outcome["startup_s"])


def _fail(workers, rank: int, cause: str, exception: BaseException | None):
    _stop(workers)
    if isinstance(exception, UnisonError):
        raise exception
    raise WorkerError(f"worker {rank} failed: {cause.strip().splitlines()[-1]}", rank=rank, cause=cause)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _stop(workers) -> None:
    """End every worker still running: SIGTERM, then SIGKILL after a grace period."""
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    for worker in workers:
        worker.join(GRACE_S)
        if worker.is_alive():
            worker.kill()
            worker.join()


def _work(rank: int, world_size: int, port: int, job: Job, pipe) -> None:
    """A worker process: join the group, train, send rank 0's outcome, leave."""
    try:
        torch.set_num_threads(threads_per_worker(world_size))
        torch.manual_seed(job.config.seed + rank)
        comm = torch_dist.join(rank, world_size, port, job.config.timeout)
        outcome = run(job, comm)
        if rank == 0:
            # Sent as bytes: tensors sent through a pipe would live in this process's shared
            # memory, which ends with it.
            pipe.send(("done", {"state": save_tensors(outcome.state), "history": outcome.history,
                                "startup_s": outcome.startup_s}))
        comm.barrier()  # nobody leaves while rank 0 may still need the group
        torch_dist.leave()
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the launcher
        trace = traceback.format_exc()
        try:
            pipe.send(("error", trace, exc if _picklable(exc) else None))
        finally:
            raise SystemExit(1)
    finally:
        pipe.close()


def _picklable(exc: BaseException) -> bool:
    try:
        pickle.dump(exc, io.BytesIO())
        return True
    except Exception:  # noqa: BLE001
        return False
