"""The workers' forkserver: started early, in the background, without importing torch here.

Worker processes of the processes backend are forked from one forkserver that imported torch
and unison's worker modules once (PRELOAD). It is started at ``import unison`` (``maybe_prestart``)
so that it imports torch while the caller's script does its own work, reused by every later
fit(), and it ends with the interpreter (a forkserver exits when its parent's pipe closes, once
it has finished its imports). It is unison's own ``ForkServer``, not multiprocessing's global
one: the user's own forkserver processes get neither its preloads nor its environment, and a
process forked from the caller (gunicorn, Celery, a fork pool) starts a fresh one of its own.

Workers get the caller's environment as it is when they start (``environment()``), not the
forkserver's, which is the caller's at ``import unison``.

The children never re-import the caller's ``__main__``: the start-up data sent to each child
drops the main module (``init_main_from_path``/``init_main_from_name``), and what a worker needs
of ``__main__`` travels by value with cloudpickle (unison.launch.processes). A script without a
``__main__`` guard, a notebook, ``python -c`` and a program read from stdin can all use it.

This module imports nothing of unison and not torch: ``import unison`` stays cheap.
"""

from __future__ import annotations

import ctypes
import io
import multiprocessing
import os
import signal
import sys
from multiprocessing import context as mp_context
from multiprocessing import forkserver, popen_forkserver, reduction, spawn, util

# What the forkserver imports once, so that every worker forked from it starts with them.
# torch._dynamo: torch.optim imports it on the first optimizer's construction (~0.7 s), and it
# must come before any process group.
PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "safetensors.torch",
           "cloudpickle", "unison.engine.loop", "unison.comm.torch_dist", "unison.launch.processes"]
IN_FORKSERVER = "UNISON_IN_FORKSERVER"  # set in the forkserver's (and so its workers') environment
OPT_OUT = "UNISON_PRESTART"             # UNISON_PRESTART=0: no forkserver at import time
_TORCHRUN = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "GROUP_RANK")
PR_SET_PDEATHSIG = 1


def available() -> bool:
    return "forkserver" in multiprocessing.get_all_start_methods()


class _Popen(popen_forkserver.Popen):
    """A forkserver child that is told nothing of the parent's main module, so it imports none."""

    def _launch(self, process_obj):
        data = spawn.get_preparation_data(process_obj._name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        buffer = io.BytesIO()
        mp_context.set_spawning_popen(self)  # fds pickled now (pipes, shared tensors) go with the child
        try:
            reduction.dump(data, buffer)
            reduction.dump(process_obj, buffer)
        finally:
            mp_context.set_spawning_popen(None)
        self.sentinel, write_end = _SERVER.connect_to_new_process(self._fds)
        kept = os.dup(write_end)  # the child watches this end to learn that its parent is gone
        self.finalizer = util.Finalize(self, util.close_fds, (kept, self.sentinel))
        with open(write_end, "wb", closefd=True) as pipe:
            pipe.write(buffer.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _Process(mp_context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj):
        return _Popen(process_obj)


class _Context(mp_context.ForkServerContext):
    Process = _Process


_CONTEXT = _Context()
_SERVER = forkserver.ForkServer()


def _forget_the_parents_server() -> None:
    """In a process forked from the caller: the forkserver is the parent's, not ours to use."""
    global _SERVER
    _SERVER = forkserver.ForkServer()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_the_parents_server)


def context() -> mp_context.BaseContext:
    """The multiprocessing context whose processes come from unison's forkserver."""
    _SERVER.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def environment() -> dict[str, str]:
    """The caller's environment now, for a worker to adopt (``adopt``)."""
    return dict(os.environ)


def adopt(env: dict[str, str]) -> None:
    """Make this worker's environment the caller's (set after ``import unison`` too)."""
    os.environ.clear()
    os.environ.update(env)
    os.environ[IN_FORKSERVER] = "1"  # unison imported in a worker's own children prestarts nothing


def ensure_running() -> None:
    """Start the forkserver if it is not running (returns at once; it imports in the background)."""
    context()
    previous = os.environ.get(IN_FORKSERVER)
    os.environ[IN_FORKSERVER] = "1"  # inherited by the forkserver only: unison there prestarts nothing
    try:
        _SERVER.ensure_running()
    finally:
        if previous is None:
            os.environ.pop(IN_FORKSERVER, None)
        else:
            os.environ[IN_FORKSERVER] = previous


def forkserver_pid() -> int | None:
    return _SERVER._forkserver_pid


def maybe_prestart() -> None:
    """At ``import unison``: start the forkserver unless opted out (UNISON_PRESTART=0), under
    torchrun (its workers are started outside), in a forkserver or worker of our own, in a child
    process of multiprocessing, or where there is no forkserver."""
    if os.environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if any(name in os.environ for name in _TORCHRUN):
        end_with_torchrun_agent()
        return
    if os.environ.get(IN_FORKSERVER):
        return
    # A child of the user's own multiprocessing (spawn or forkserver) imports unison while it
    # unpickles its target, before parent_process() is set: _inheriting says so then.
    child = multiprocessing.parent_process() is not None or getattr(multiprocessing.current_process(),
                                                                    "_inheriting", False)
    if child or not available():
        return
    if getattr(sys, "frozen", False) or _cli_without_training():
        return
    try:
        ensure_running()
    except (OSError, RuntimeError):  # no forkserver now: fit() starts one itself, or says why it cannot
        pass


def _cli_without_training() -> bool:
    """`unison --help`, `unison report ...`: the command line trains only in train and compare
    (which start the forkserver early themselves, unison.plan.start_early)."""
    return os.path.basename(sys.argv[0]) == "unison" and (sys.argv[1:2] or [""])[0] not in ("train", "compare")


def end_with_torchrun_agent() -> None:
    """torchrun forwards SIGTERM to its workers but cannot forward a SIGKILL: a rank would train
    on as an orphan. As early as ``import unison``, ask Linux for a SIGTERM when the agent dies
    (a checkpoint save in progress finishes first, unison.engine.checkpointer)."""
    if os.environ.get("TORCHELASTIC_RUN_ID") is None or os.environ.get(IN_FORKSERVER):
        return  # a RANK/WORLD_SIZE set by hand: the parent is not torchrun's agent
    agent = os.getppid()
    watch_parent(signal.SIGTERM)
    if os.getppid() != agent:  # the agent died before the request: nothing would signal us
        os.kill(os.getpid(), signal.SIGTERM)


def watch_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (PR_SET_PDEATHSIG).

    Linux ties this to the parent's *thread* that forked the child, so it is used only where
    that thread lives as long as its process: a forkserver's workers, torchrun's ranks."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - no prctl: the pipe watch remains
        pass
