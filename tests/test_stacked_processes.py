"""Hierarchical stacking: 2 processes × 2 stacked replicas give the same merged model as 4
threads replicas, on the processes backend and under torchrun."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import unison
from unison.data import prepare
from unison.models import mlp

from reference import max_abs_diff

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


RUN_FILE = """
[data]
dataset = "moons"
[model]
hidden = [16]
[train]
strategy = "periodic(every=5)"
workers = 2
replicas_per_worker = 2
backend = "processes"
epochs = 2
batch_size = 16
lr = 0.1
momentum = 0.9
"""


def test_torchrun_with_two_stacked_replicas_per_rank_equals_four_threads(tmp_path):
    run_file = tmp_path / "run.toml"
    run_file.write_text(RUN_FILE)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "unison", "train", str(run_file), "--out", str(out), "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "replicas_per_worker = 2" in (out / "config.toml").read_text()

    data = prepare("moons", seed=0)
    expected = unison.fit(lambda: mlp(data.features, [16], data.outputs), data, strategy="periodic(every=5)",
                          workers=4, backend="threads", epochs=2, batch_size=16, lr=0.1, momentum=0.9,
                          progress=False)
    saved = load_file(out / "model.safetensors")
    for name, tensor in expected.model.state_dict().items():
        assert (saved[name] - tensor).abs().max() <= 1e-5, name
