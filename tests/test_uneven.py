"""Uneven workers: declared speeds (a simulation), shares balanced by speed, rounds that close
without the stragglers. Each checked against a sequential computation (tests/reference.py)."""

import threading

import pytest
import torch

import unison
from unison.engine import pace
from unison.errors import ConfigError

from reference import max_abs_diff


def fit(model, data, **kwargs):
    kwargs = {"backend": "threads", "epochs": 2, "batch_size": 8, "lr": 0.1, "progress": False,
              "val": None} | kwargs
    return unison.fit(model, data, **kwargs)


def identical(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class FakeClock:
    """Every thread's own clock, one second further at every reading; sleeps recorded, not slept."""

    def __init__(self):
        self.local, self.slept, self.lock = threading.local(), [], threading.Lock()

    def perf_counter(self):
        self.local.now = getattr(self.local, "now", 0.0) + 1.0
        return self.local.now

    def sleep(self, seconds):
        with self.lock:
            self.slept.append(seconds)


@pytest.mark.parametrize("strategy", ["sync", "periodic(every=4)"])
def test_speeds_change_time_only_and_the_wait_is_recorded(blobs, small_model, strategy, monkeypatch):
    plain = fit(small_model, blobs, strategy=strategy, workers=3, momentum=0.9)
    clock = FakeClock()
    monkeypatch.setattr(pace, "perf_counter", clock.perf_counter)
    monkeypatch.setattr(pace, "sleep", clock.sleep)
    slowed = fit(small_model, blobs, strategy=strategy, workers=3, momentum=0.9, speeds=[1, 0.5, 0.25])
    assert identical(plain.model, slowed.model)
    assert [r["step"] for r in plain.history] == [r["step"] for r in slowed.history]
    # each step's gradients "take" 1 s on the fake clock: worker 1 waits 1 s, worker 2 3 s a step
    steps = plain.history[-1]["step"]  # 96 samples, 3 workers, batch 8: 4 steps an epoch
    assert sorted(clock.slept) == [1.0] * steps + [3.0] * steps
    assert sum(r["simulated_wait_s"] for r in slowed.history) == pytest.approx(4.0 * steps)
    assert all("simulated_wait_s" not in r for r in plain.history)
    assert "SIMULATED speeds [1.0, 0.5, 0.25]" in slowed.summary()


def test_speeds_really_wait(blobs, small_model):
    """On the real clock the slow worker's waits add up to its slowdown times its compute time."""
    result = fit(small_model, blobs, strategy="periodic(every=epoch)", workers=2, speeds=[2, 1], epochs=1)
    waited = sum(r["simulated_wait_s"] for r in result.history)
    assert waited > 0
    assert result.history[-1]["wall_s"] - result.startup_s >= waited * 0.99


@pytest.mark.parametrize("speeds, message", [
    ([1, 0], "speeds=[1, 0] is not accepted"),
    ([1, -1], "speeds=[1, -1]"),
    ([1, float("inf")], "speeds="),
    ([1, True], "speeds="),
    ("fast", "speeds='fast'"),
    ([], "speeds=[]"),
    ([1, 1, 1], "one number per worker: 2"),
])
def test_bad_speeds_are_refused_before_any_worker_starts(blobs, small_model, speeds, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        fit(small_model, blobs, workers=2, speeds=speeds)


def test_speeds_are_refused_for_stacked_replicas(blobs, small_model):
    with pytest.raises(ConfigError, match="stacked"):
        fit(small_model, blobs, workers=2, backend="stacked", speeds=[1, 0.5])
