"""The workers' forkserver: started early, in the background, without importing torch here.

Worker processes of the processes backend are forked from one forkserver that imported torch
and unison's worker modules once (PRELOAD). It is started at ``import unison`` (``maybe_prestart``)
so that it imports torch while the caller's script does its own work, reused by every later
fit(), and it ends with the interpreter (the stdlib forkserver exits when its parent's pipe
closes; it also asks the kernel to kill it if its parent dies first, see ``watch_parent``).

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

# What the forkserver imports once, so that every worker forked from it starts with them. The
# first one makes the forkserver die with its parent. torch._dynamo: torch.optim imports it on
# the first optimizer's construction (~0.7 s), and it must come before any process group.
PRELOAD = ["unison._forkserver_guard", "torch", "torch._dynamo", "torch.distributed", "safetensors.torch",
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
        self.sentinel, write_end = forkserver.connect_to_new_process(self._fds)
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


def context() -> mp_context.BaseContext:
    """The multiprocessing context whose processes come from unison's forkserver."""
    _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def ensure_running() -> None:
    """Start the forkserver if it is not running (returns at once; it imports in the background)."""
    context()
    previous = os.environ.get(IN_FORKSERVER)
    os.environ[IN_FORKSERVER] = "1"  # inherited by the forkserver only: unison there prestarts nothing
    try:
        forkserver.ensure_running()
    finally:
        if previous is None:
            os.environ.pop(IN_FORKSERVER, None)
        else:
            os.environ[IN_FORKSERVER] = previous


def forkserver_pid() -> int | None:
    return getattr(forkserver._forkserver, "_forkserver_pid", None)


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
    if getattr(sys, "frozen", False):
        return
    try:
        ensure_running()
    except (OSError, RuntimeError):  # no forkserver now: fit() starts one itself, or says why it cannot
        pass


def end_with_torchrun_agent() -> None:
    """torchrun forwards SIGTERM to its workers but cannot forward a SIGKILL: a rank would train
    on as an orphan. As early as ``import unison``, ask Linux for a SIGTERM when the agent dies
    (a checkpoint save in progress finishes first, unison.engine.checkpointer)."""
    if os.environ.get("TORCHELASTIC_RUN_ID") is None or os.environ.get(IN_FORKSERVER):
        return  # a RANK/WORLD_SIZE set by hand: the parent is not torchrun's agent
    watch_parent(signal.SIGTERM)
    if os.getppid() == 1:  # the agent died before the request: nothing would signal us
        os.kill(os.getpid(), signal.SIGTERM)


def watch_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (PR_SET_PDEATHSIG).

    Linux ties this to the parent's *thread* that started the child: a forkserver started from a
    thread that later ends is killed then, and the next fit() starts a fresh one (ensure_running
    notices). ``import unison`` starts it from the importing thread, usually the main one."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - no prctl: the pipe watch remains
        pass
