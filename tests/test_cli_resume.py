"""`unison train` with checkpoints: a failed run is kept unfinished and `--resume` completes it."""

import pytest
import torch
from safetensors.torch import load_file

import unison.engine.replica
from unison import checkpoint as files
from unison.cli import main

RUN = """
[data]
dataset = "xor"
[model]
hidden = [8]
activation = "tanh"
[train]
strategy = "periodic(every=5)"
workers = 2
backend = "threads"
epochs = 3
batch_size = 16
lr = 0.1
momentum = 0.9
checkpoint_every = 2
"""


@pytest.fixture
def run_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(RUN)
    return path


def fail_at_step(monkeypatch, step):
    real = unison.engine.replica.Replica.forward_backward

    def forward_backward(self, x, y):
        if self.step + 1 == step:
            raise RuntimeError("power cut")
        return real(self, x, y)

    monkeypatch.setattr(unison.engine.replica.Replica, "forward_backward", forward_backward)


def test_a_failed_run_is_kept_unfinished_and_resume_completes_it(run_file, tmp_path, capsys, monkeypatch):
    out, partial = tmp_path / "out", tmp_path / ".out.partial"
    with monkeypatch.context() as patch:
        fail_at_step(patch, 27)  # 13 steps an epoch; rounds every 5 steps, a checkpoint every 2 rounds
        assert main(["train", str(run_file), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "power cut" in err
    assert f"last checkpoint: {partial / 'checkpoints' / 'ckpt-000000020'}" in err
    assert f"`unison train --resume {out}` continues from it" in err
    assert not out.exists() and (partial / "config.toml").exists()

    assert main(["train", str(run_file), "--out", str(out)]) == 2  # a fresh run would lose it
    assert "--resume" in capsys.readouterr().err

    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert not partial.exists()
    assert {"config.toml", "history.jsonl", "model.safetensors", "summary.txt", "checkpoints"} == \
        {p.name for p in out.iterdir()}
    assert files.steps_on_disk(out / "checkpoints") == [39, 30]
    assert main(["train", str(run_file), "--out", str(tmp_path / "whole"), "--quiet"]) == 0
    resumed, whole = load_file(out / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert all(torch.allclose(resumed[k], whole[k], atol=1e-6, rtol=0) for k in whole)
    assert (out / "history.jsonl").read_text().count("\n") == 8  # rounds at 5, 10, ... 35, and 39


def test_overwrite_discards_an_unfinished_run(run_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        fail_at_step(patch, 15)
        assert main(["train", str(run_file), "--out", str(out), "--quiet"]) == 2
    assert main(["train", str(run_file), "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert not (tmp_path / ".out.partial").exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("args, words", [
    (["--resume", "nowhere"], ["no unfinished run to resume", ".nowhere.partial"]),
    (["RUN", "--resume", "x"], ["not both"]),
    ([], ["needs a run file"]),
    (["--resume", "x", "--out", "y"], ["leave out --out"]),
    (["RUN", "--set", "train.nan=ignore"], ["nan='ignore'", "'rollback'"]),
    (["RUN", "--set", "train.checkpoint_every=-1"], ["checkpoint_every=-1", "'10min'"]),
])
def test_bad_resume_requests_are_one_line_errors(run_file, tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *[str(run_file) if a == "RUN" else a for a in args]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    for word in words:
        assert word in err
