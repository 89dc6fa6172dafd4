"""Hierarchical stacking: 2 processes × 2 stacked replicas give the same merged model as 4
threads replicas, on the processes backend and under torchrun."""

import pytest
import torch

import unison
from unison.models import mlp

from reference import max_abs_diff
from torchrun_runs import MOONS_RUN, assert_saved_model_equals, moons_on_threads, torchrun_train

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(240)]


@pytest.mark.parametrize("strategy", ["periodic(every=3, optimizer_state=average)", "sync",
                                      "oneshot(merge=greedy_soup)"])
def test_two_processes_of_two_stacked_replicas_equal_four_threads(blobs, strategy):
    x, y = blobs
    torch.manual_seed(0)
    model = mlp(8, [16], 3, batchnorm=True)
    kwargs = dict(strategy=strategy, epochs=2, batch_size=8, lr=0.1, momentum=0.9, progress=False,
                  val=(x[:16] + 0.5, y[:16]))
    hierarchical = unison.fit(model, blobs, backend="processes", workers=2, replicas_per_worker=2, **kwargs)
    flat = unison.fit(model, blobs, backend="threads", workers=4, **kwargs)
    assert max_abs_diff(hierarchical.model, flat.model) <= 1e-5
    assert [r["step"] for r in hierarchical.history] == [r["step"] for r in flat.history]
    for a, b in zip(hierarchical.history, flat.history):
        assert a["samples"] == b["samples"] and a["val_acc"] == b["val_acc"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["divergence"] == pytest.approx(b["divergence"], rel=1e-4, abs=1e-6)
        assert 0 < a["comm_bytes"] < b["comm_bytes"]  # two workers exchange less than four


def test_torchrun_with_two_stacked_replicas_per_rank_equals_four_threads(tmp_path):
    run = MOONS_RUN.replace("workers = 2\n", "workers = 2\nreplicas_per_worker = 2\n")
    _, out = torchrun_train(run, tmp_path)
    assert "replicas_per_worker = 2" in (out / "config.toml").read_text()
    assert_saved_model_equals(out, moons_on_threads(workers=4))
