"""`torchrun -m unison train` on a run file, and the threads run its saved model must equal."""

import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

import unison
from unison.data import prepare
from unison.models import mlp

# What the run files of tests/test_torchrun.py and tests/test_stacked_processes.py train.
MOONS_RUN = """
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


def torchrun_train(run_text: str, tmp_path: Path, nproc: int = 2) -> tuple[subprocess.CompletedProcess, Path]:
    """Run `unison train` on ``run_text`` under torchrun with ``nproc`` processes; (the finished
    process, the run directory). Fails the test if it did not succeed."""
    run_file, out = tmp_path / "run.toml", tmp_path / "run"
    run_file.write_text(run_text)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "unison", "train", str(run_file), "--out", str(out), "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr
    return done, out


def moons_on_threads(workers: int) -> unison.Result:
    """MOONS_RUN's training with ``workers`` replicas on the threads backend."""
    data = prepare("moons", seed=0)
    return unison.fit(lambda: mlp(data.features, [16], data.outputs), data, strategy="periodic(every=5)",
                      workers=workers, backend="threads", epochs=2, batch_size=16, lr=0.1, momentum=0.9,
                      progress=False)


def assert_saved_model_equals(out: Path, expected: unison.Result) -> None:
    saved = load_file(out / "model.safetensors")
    for name, tensor in expected.model.state_dict().items():
        assert (saved[name] - tensor).abs().max() <= 1e-5, name
