"""Backend "processes": N worker processes on this machine, gloo over 127.0.0.1.

Workers are forked from a forkserver that imported torch and unison once (unison.startup:
started at ``import unison`` in the background, or by fit(), and kept for later runs), so a
worker starts in a fraction of a second instead of importing torch anew as a spawned one would.
Plain ``fork`` is not used: a child forked after the parent ran an OpenMP region hangs in its
own first multi-threaded op (libgomp), and CUDA cannot be used in a forked child. The forkserver
process never runs an op, so both are safe. Where there is no forkserver, spawn is used.

A worker never imports the caller's ``__main__``: the Job travels by value with cloudpickle, so
a model class, factory or loss defined in a script without a main guard, a notebook, ``python
-c`` or stdin reaches the workers as it is.

The data set is moved to shared memory once and every worker maps it; nothing is copied per
worker. The launcher watches every worker: if one dies or raises, the others are ended and
fit() raises WorkerError naming the rank and its exit code, signal or traceback (the blame is
unison.launch.worker's, shared with the threads backend). A worker watches its launcher in turn:
it leaves when the launcher's end of its lifeline pipe closes (the launcher died, even by
SIGKILL), and Linux kills it when its forkserver dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections import ChainMap
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler

import cloudpickle
import torch
import torch.multiprocessing  # noqa: F401 - registers the shared-memory reducers of tensors
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .. import startup
from ..comm import torch_dist
from ..comm.base import PeerFailed
from ..engine.job import Job, Outcome
from ..errors import ConfigError, WorkerError
from ..strategies.base import POINT_TO_POINT, SHARED_MEMORY
from .base import Backend
from .worker import NAMED_GRACE_S, SYMPTOM_GRACE_S, Failure, blame, in_this_process, own_process

GRACE_S = 3.0  # how long a worker may take to stop when asked before it is killed
HOST = "127.0.0.1"  # the workers are processes of this machine: the group talks over loopback


def _context():
    if not startup.available():
        return torch.multiprocessing.get_context("spawn")
    return startup.context()


class _ByValuePickler(cloudpickle.Pickler):
    """cloudpickle (what __main__ defines travels by value) with multiprocessing's reducers
    (tensors in shared memory travel as handles, not copies)."""

    dispatch_table = ChainMap(ForkingPickler._extra_reducers, getattr(cloudpickle.Pickler, "dispatch_table",
                                                                      copyreg.dispatch_table))


class _ByValue:
    """The Job as a worker receives it: pickled with cloudpickle while the worker is started (so
    the file descriptors of shared tensors go with that worker), unpickled there by pickle."""

    def __init__(self, job: Job) -> None:
        self.job = job

    def __reduce__(self):
        buffer = io.BytesIO()
        _ByValuePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(self.job)
        return (_unpickle, (buffer.getvalue(),))


def _unpickle(data: bytes) -> _ByValue:
    return _ByValue(pickle.loads(data))


class Processes(Backend):
    name = "processes"
    offers = frozenset({SHARED_MEMORY, POINT_TO_POINT})
    stacks_per_worker = True
    recovers_lost = True  # its workers are its children: a lost one is ended with the rest and left out anew

    def prestart(self, workers: int) -> None:
        """Start the forkserver while the caller prepares its data; not for one worker, which
        trains in the caller's process (a forkserver importing torch would only take a core)."""
        if workers > 1:
            prestart()

    def launch(self, job: Job) -> Outcome:
        return launch(job)


def prestart() -> None:
    """Start the forkserver (it imports unison.startup.PRELOAD) so that it is ready by the time
    the workers are needed; it usually runs already, started at ``import unison``."""
    if startup.available():
        startup.ensure_running()


def wait_until_ready() -> None:
    """Return once the forkserver has imported PRELOAD (starting it if need be): a trivial
    process forked from it has come and gone."""
    if startup.available():
        process = _context().Process(target=_nothing, name="unison-warm-up")
        process.start()
        process.join()


def _nothing() -> None:
    pass


def launch(job: Job) -> Outcome:
    if job.workers == 1:  # one worker needs no process of its own, nor its start-up time
        return in_this_process(job)
    _check_importable(job)
    job.data.share_memory_()
    if job.strategy.shares_model:  # hogwild: every worker maps these same tensors
        job.model.share_memory()
    store = torch_dist.host_store(job.workers, job.timeout, HOST)
    context = _context()
    pipes, workers, lifelines = [], [], []
    try:
        for rank in range(job.workers):
            receiver, sender = context.Pipe(duplex=False)
            watched, lifeline = context.Pipe(duplex=False)  # never written: its EOF is the message
            worker = context.Process(target=_work, args=(rank, store.port, _ByValue(job), sender, watched,
                                                                  startup.environment()),
                                     name=f"unison-worker-{rank}", daemon=True)
            try:
                worker.start()
            except (pickle.PicklingError, AttributeError, TypeError) as exc:
                raise ConfigError(f"cannot send the run to worker processes ({exc}); make the model, loss "
                                  "and optimizer picklable (no locks, open files or generators in them), "
                                  "or use backend='threads'") from None
            sender.close()  # the child holds its own end; EOF then means the child is gone
            watched.close()
            pipes.append(receiver)
            workers.append(worker)
            lifelines.append(lifeline)
        return _supervise(workers, pipes)
    finally:
        _stop(workers)
        for lifeline in lifelines:
            lifeline.close()
        del store


def _check_importable(job: Job) -> None:
    """Spawned workers (only where there is no forkserver) re-run the caller's script to start:
    refuse a program that cannot be re-run. Forkserver workers never import __main__."""
    if startup.available():
        return
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file and not os.path.isfile(main_file):  # "<stdin>"
        raise ConfigError(f"worker processes cannot be started from a program read from {main_file} "
                          "on this platform; save it to a file and run that, or use backend='threads'")


def _supervise(workers, pipes) -> Outcome:
    """Wait for rank 0's outcome and every worker's goodbye; fail fast on the first failure."""
    outcome: dict | None = None
    running, closed, finished = set(range(len(workers))), set(), set()
    failures: list[Failure] = []
    symptoms_since = None
    while running:
        patience = None if symptoms_since is None else _patience(time.monotonic() - symptoms_since)
        ready = wait([pipes[r] for r in running - closed] + [workers[r].sentinel for r in running], patience)
        for rank in sorted(running):
            exited = workers[rank].sentinel in ready
            while rank not in closed and (exited or (pipes[rank] in ready and pipes[rank].poll())):
                try:  # an exited worker's pipe is drained to EOF: its last words come first
                    kind, *body = pipes[rank].recv()
                except EOFError:
                    closed.add(rank)
                    break
                except Exception as exc:  # noqa: BLE001 - a message that cannot be read back
                    kind, body = "error", [f"its error report could not be read: {exc!r}", None, False]
                if kind == "done":
                    outcome = body[0]
                elif kind == "bye":
                    finished.add(rank)
                else:
                    failures.append(Failure(rank, body[0], body[1], symptom=body[2]))
                if not exited:
                    break
            if exited:
                workers[rank].join()
                code = workers[rank].exitcode
                # A worker that said goodbye has finished its work; how its exit went no longer matters.
                if code != 0 and rank not in finished and not any(f.rank == rank for f in failures):
                    failures.append(Failure(rank, _describe_exit(code), signalled=code < 0, died=True))
                running.discard(rank)
        if failures:
            symptoms_since = symptoms_since or time.monotonic()
            _raise_blame(workers, failures, running, waited_s=time.monotonic() - symptoms_since)
    if failures:
        _raise_blame(workers, failures, running, waited_s=float("inf"))
    if outcome is None:
        raise WorkerError("worker 0 exited without sending the trained model", rank=0)
    return Outcome(state=load_tensors(outcome["state"]), history=outcome["history"],
                   startup_s=outcome["startup_s"])


def _patience(waited_s: float) -> float:
    """Seconds until blame's next grace ends (it may then name a cause it could not before)."""
    return max(0.0, min((g for g in (NAMED_GRACE_S, SYMPTOM_GRACE_S) if g > waited_s), default=0.0) - waited_s)


def _raise_blame(workers, failures: list[Failure], running: set[int], waited_s: float) -> None:
    """Once the cause is known (unison.launch.worker.blame), end every worker and raise it."""
    error = blame(failures, sorted(running - {f.rank for f in failures}), waited_s)
    if error is not None:
        _stop(workers)
        raise error


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _stop(workers) -> None:
    """End every worker still running: SIGCONT (a stopped worker could not act on the rest), then
    SIGTERM, then SIGKILL after a grace period."""
    for worker in workers:
        if worker.is_alive():
            try:
                os.kill(worker.pid, signal.SIGCONT)
            except (ProcessLookupError, TypeError):
                pass
            worker.terminate()
    for worker in workers:
        worker.join(GRACE_S)
        if worker.is_alive():
            worker.kill()
            worker.join()


def _watch_launcher(watched) -> None:
    """Leave at once when the launcher is gone: its end of ``watched`` closed (EOF)."""
    try:
        watched.recv_bytes()
    except (EOFError, OSError):
        pass
    os._exit(1)


def _work(rank: int, port: int, received: _ByValue, pipe, watched, env: dict[str, str]) -> None:
    """A worker process: join the group, train, send rank 0's outcome, say goodbye, leave."""
    code = 0
    startup.adopt(env)  # the caller's environment now (GLOO_SOCKET_IFNAME set after import unison, ...)
    startup.watch_parent()  # killed if the forkserver dies (it dies with the launcher)
    threading.Thread(target=_watch_launcher, args=(watched,), name="unison-lifeline", daemon=True).start()
    try:
        job = received.job
        if job.progress and rank == 0:
            # tqdm's default lock is a multiprocessing semaphore; this process leaves through
            # os._exit, which would leak it. A worker draws one bar: a thread lock is enough.
            from tqdm import tqdm
            tqdm.set_lock(threading.RLock())
        comm = torch_dist.join(rank, job.workers, HOST, port, job.timeout)
        outcome = own_process(job, comm, local_workers=job.workers)
        if rank == 0:
            # Sent as bytes: tensors sent through a pipe would live in this process's shared
            # memory, which ends with it.
            pipe.send(("done", {"state": save_tensors(outcome.state), "history": outcome.history,
                                "startup_s": outcome.startup_s}))
        comm.barrier()  # nobody leaves while rank 0 may still need the group
        torch_dist.leave()
        pipe.send(("bye",))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the launcher
        code = 1
        try:
            pipe.send(("error", traceback.format_exc(), exc if _round_trips(exc) else None,
                       isinstance(exc, PeerFailed)))
        except Exception:  # noqa: BLE001 - the launcher still sees the exit code
            pass
    finally:
        pipe.close()
        sys.stdout.flush()
        sys.stderr.flush()
        # gloo's threads can abort the interpreter's teardown ("terminate called without an
        # active exception") after the work is done and reported: skip that teardown.
        os._exit(code)


def _round_trips(exc: BaseException) -> bool:
    """Whether the launcher can unpickle this exception (custom __init__s often break it)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return True
    except Exception:  # noqa: BLE001
        return False


BACKEND = Processes()
