"""torchrun: `torchrun -m unison train` runs the same job in torchrun's process group."""

import subprocess
import sys

import pytest
from safetensors.torch import load_file

import unison
from unison.data import prepare
from unison.models import mlp

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(240)]

RUN_FILE = """
[data]
dataset = "moons"
[model]
hidden = [16]
[train]
strategy = "periodic(every=5)"
workers = 2
backend = "processes"
epochs = 2
batch_size = 16
lr = 0.1
momentum = 0.9
"""


def test_torchrun_train_equals_threads(tmp_path):
    run_file = tmp_path / "run.toml"
    run_file.write_text(RUN_FILE)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "unison", "train", str(run_file), "--out", str(out), "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "backend=torchrun" in done.stdout and "final validation accuracy" in done.stdout
    assert '"torchrun"' in (out / "config.toml").read_text()

    data = prepare("moons", seed=0)
    expected = unison.fit(lambda: mlp(data.features, [16], data.outputs), data, strategy="periodic(every=5)", workers=2, backend="threads",
                          epochs=2, batch_size=16, lr=0.1, momentum=0.9, progress=False)
    saved = load_file(out / "model.safetensors")
    for name, tensor in expected.model.state_dict().items():
        assert (saved[name] - tensor).abs().max() <= 1e-5, name
    history = unison.history.read_jsonl(out / "history.jsonl")
    assert [r["step"] for r in history] == [r["step"] for r in expected.history]
    assert history[-1]["val_acc"] == expected.history[-1]["val_acc"]


def test_torchrun_backend_outside_torchrun_is_refused(blobs, small_model, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(unison.ConfigError, match="torchrun's environment"):
        unison.fit(small_model, blobs, backend="torchrun")
