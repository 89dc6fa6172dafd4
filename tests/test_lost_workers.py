"""on_failure="continue" for a worker process that dies or stalls (issue 15, item 3): the run is
launched again without it, from the newest checkpoint (else from the start), and equals a
sequential simulation in which that worker weighs 0 from the resumed round on."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

import unison
from unison.errors import ConfigError, WorkerDropped, WorkerError
from unison.api import HISTORY_FILE
from unison.history import read_jsonl

from reference import max_abs_diff, sampler_order
from test_uneven import weighted_local_sgd
from toy_models import current_rank

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(240)]


class LostOnce(torch.nn.Module):
    """Linear 8 → 3 whose replica ``rank`` is lost in its ``at``-th training forward pass, the
    first time only (``marker`` records it, so the relaunched run trains normally): "kill"
    sends itself SIGKILL, "exit" leaves with code 3, "hang" sleeps ``seconds``."""

    def __init__(self, marker, how="kill", rank=1, at=5, seconds=60.0, after=None):
        super().__init__()
        self.after = None if after is None else str(after)  # first wait (≤ 20 s) for this path to exist
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(8, 3)
        self.marker, self.how, self.rank, self.at, self.seconds = str(marker), how, rank, at, seconds
        self.calls = 0

    def forward(self, x):
        if self.training and (torch.distributed.is_initialized()
                              or threading.current_thread().name.startswith("unison-worker-")):
            self.calls += 1
            if current_rank() == self.rank and self.calls == self.at and not os.path.exists(self.marker):
                for _ in range(200):  # rank 0 writes the checkpoint while this rank trains on
                    if self.after is None or os.path.exists(self.after):
                        break
                    time.sleep(0.1)
                Path(self.marker).write_text(str(os.getpid()))
                if self.how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                elif self.how == "exit":
                    os._exit(3)
                else:
                    time.sleep(self.seconds)
        return self.linear(x)


def fit(model, data, **kwargs):
    settings = dict(backend="processes", workers=3, epochs=2, batch_size=8, lr=0.1, progress=False,
                    strategy="periodic(every=4)", on_failure="continue")
    return unison.fit(model, data, **(settings | kwargs))


def simulation(model, blobs, dropped):
    x, y = blobs
    return weighted_local_sgd(model, x, y, orders=lambda r, e: sampler_order(96, 3, r, e, 0),
                              batches=[[8, 8, 8]] * 2, steps=4, epochs=2, lr=0.1, every=4, dropped=dropped)


def test_a_killed_worker_is_dropped_and_the_run_resumes_from_its_checkpoint(blobs, tmp_path):
    # step 5: the second round, once the first round's checkpoint is complete (killed while rank 0
    # still wrote it, the run would go on from the start: right, but not what this test checks)
    model = LostOnce(tmp_path / "lost", how="kill", rank=1, at=5, after=tmp_path / "ckpt" / "ckpt-000000004")
    with pytest.warns(WorkerDropped, match=r"worker 1 failed: killed by signal SIGKILL; on_failure='continue': "
                                           r"worker 1 is dropped .* from its checkpoint .*ckpt-000000004"):
        result = fit(model, blobs, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=1)
    assert (tmp_path / "lost").exists()
    assert ["failed_workers" in r for r in result.history] == [False, True]
    assert [r["samples"] for r in result.history] == [96, 96 + 2 * 4 * 8]  # worker 1's share is left out
    walls = [r["wall_s"] for r in result.history]  # counted once from fit()'s start, across the relaunch
    assert walls == sorted(walls) and walls[-1] <= result.wall_s
    expected = simulation(model, blobs, dropped=[[], [1]])  # the first round kept all three
    assert max_abs_diff(result.model, expected) <= 1e-5
    # the dropped worker stays dropped on a later resume from the last checkpoint
    more = fit(model, blobs, epochs=3, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=1, resume=True)
    assert more.history[-1]["failed_workers"] == [1] and more.history[-1]["samples"] == 160 + 2 * 4 * 8


def test_without_checkpoints_the_run_restarts_without_the_lost_worker(blobs, tmp_path):
    model = LostOnce(tmp_path / "lost", how="exit", rank=2, at=3)
    with pytest.warns(WorkerDropped, match=r"worker 2 failed: exited with code 3.*from the start "
                                           r"\(set checkpoint_every to lose less\)"):
        result = fit(model, blobs, log_dir=str(tmp_path / "log"))
    assert [r["failed_workers"] for r in result.history] == [[2], [2]]
    assert max_abs_diff(result.model, simulation(model, blobs, dropped=[[2], [2]])) <= 1e-5
    logged = read_jsonl(tmp_path / "log" / HISTORY_FILE)
    assert [r["step"] for r in logged] == [r["step"] for r in result.history]  # the log is the relaunch's


def test_a_stalled_worker_is_dropped_after_the_timeout(blobs, tmp_path):
    model = LostOnce(tmp_path / "lost", how="hang", rank=0, at=2, seconds=120)
    started = time.monotonic()
    with pytest.warns(WorkerDropped, match=r"worker 0 failed: it reported nothing while its peers' collectives failed.*"
                                           r"worker 0 is dropped"):
        result = fit(model, blobs, timeout=3.0, strategy="sync")
    assert time.monotonic() - started < 60  # not the 120 s it slept
    assert result.history[-1]["failed_workers"] == [0] and result.history[-1]["step"] == 8


def test_what_is_not_a_lost_worker_still_stops_the_run(blobs, tmp_path):
    # the default policy stops at a killed worker, naming it
    with pytest.raises(WorkerError, match="worker 1 failed: killed by signal SIGKILL"):
        fit(LostOnce(tmp_path / "a", rank=1, at=2), blobs, on_failure="stop")
    # threads cannot end a stalled thread: a stall there fails the run as before
    with pytest.raises(WorkerError, match="rank 1 did not arrive"):
        fit(LostOnce(tmp_path / "c", how="hang", rank=1, at=2, seconds=5), blobs, backend="threads", timeout=2.0)
    with pytest.raises(ConfigError):
        fit(LostOnce(tmp_path / "d"), blobs, on_failure="sometimes")
