"""Nothing outlives the caller, and a stopped worker is named: the caller killed mid-fit leaves
no worker nor forkserver running; a worker stopped by SIGSTOP is reported within its timeout."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from torch import nn

import unison
from unison.comm.torch_dist import ROLL_CALL_S
from unison.launch.worker import NAMED_GRACE_S
from unison.errors import WorkerError

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]

CALLER = """
import os, sys, time
import torch, unison
from torch import nn
from unison import startup
folder = sys.argv[1]

class Tells(nn.Module):  # each worker writes its pid when it trains, then trains slowly
    def __init__(self):
        super().__init__(); self.l = nn.Linear(4, 2)
    def forward(self, x):
        import torch.distributed as dist
        if dist.is_initialized():
            path = os.path.join(folder, f"worker-{dist.get_rank()}")
            if not os.path.exists(path):
                with open(path + ".tmp", "w") as f:
                    f.write(str(os.getpid()))
                os.replace(path + ".tmp", path)
            time.sleep(0.05)
        return self.l(x)

x = torch.randn(512, 4); y = (x[:, 0] > 0).long()
unison.prestart()
with open(os.path.join(folder, "forkserver.tmp"), "w") as f:
    f.write(str(startup.forkserver_pid()))
os.replace(os.path.join(folder, "forkserver.tmp"), os.path.join(folder, "forkserver"))
unison.fit(Tells(), (x, y), workers=2, backend="processes", strategy="sync", epochs=100, batch_size=8,
           progress=False)
"""


def alive(pid: int) -> bool:
    """Running or stopped; a zombie (exited, not yet reaped) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_for(paths, seconds):
    deadline = time.monotonic() + seconds
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"not written in {seconds} s: {[str(p) for p in paths if not p.exists()]}"
        time.sleep(0.05)
    return [int(p.read_text()) for p in paths]


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_caller_mid_fit_leaves_no_worker_nor_forkserver(tmp_path, how):
    caller = subprocess.Popen([sys.executable, "-c", CALLER, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        pids = wait_for([tmp_path / "worker-0", tmp_path / "worker-1", tmp_path / "forkserver"], 40)
        assert all(alive(pid) for pid in pids)  # training when the caller is killed
        caller.send_signal(how)
        caller.wait(10)
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in pids if alive(pid)] == []
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()


class StopsOnRank1(nn.Module):
    """A linear model whose rank-1 worker stops itself (SIGSTOP) at its 4th forward pass, having
    written the time it did so to ``path``."""

    def __init__(self, path: str):
        super().__init__()
        self.linear = nn.Linear(8, 3)
        self.path = path
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if dist.is_initialized() and dist.get_rank() == 1 and self.calls == 4:
            Path(self.path).write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGSTOP)
        return self.linear(x)


def test_a_stopped_worker_is_named_within_its_timeout_and_ended(blobs, tmp_path):
    stamp = tmp_path / "stopped"
    with pytest.raises(WorkerError) as info:
        unison.fit(StopsOnRank1(str(stamp)), blobs, strategy="sync", workers=2, backend="processes", epochs=20,
                   batch_size=8, timeout=5, progress=False)
    reported = time.time()
    assert info.value.rank == 1 and "worker 1" in str(info.value), str(info.value)
    assert "did not arrive" in str(info.value)
    # the timeout, rank 0's roll call naming the missing rank, blame's grace for its own report, slack
    bound = 5 + ROLL_CALL_S + NAMED_GRACE_S + 1.5
    assert reported - float(stamp.read_text()) <= bound
    for child in __import__("multiprocessing").active_children():  # the stopped one was ended too
        assert not child.name.startswith("unison-worker"), child


LONG_RUN = """[data]
dataset = "digits"
[model]
hidden = [64]
[train]
strategy = "periodic(every=epoch)"
backend = "torchrun"
epochs = 100000
batch_size = 16
"""


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


@pytest.mark.timeout(90)
def test_killing_torchrun_mid_run_leaves_no_worker(tmp_path):
    """The other launcher whose workers are processes: torchrun's agent SIGKILLed mid-run."""
    torchrun = Path(sys.executable).with_name("torchrun")
    (tmp_path / "run.toml").write_text(LONG_RUN)
    agent = subprocess.Popen([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "unison", "train",
                              "run.toml", "--out", "out"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(workers := children(agent.pid)) < 2:
            assert time.monotonic() < deadline and agent.poll() is None, "torchrun's workers did not start"
            time.sleep(0.1)
        time.sleep(5)  # imported, joined and training
        assert agent.poll() is None and all(alive(pid) for pid in workers)
        agent.kill()
        agent.wait(10)
        deadline = time.monotonic() + 2
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in workers if alive(pid)] == []
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
