"""The command line: run directories, one-line errors with exit status 2, no overwrite."""

import subprocess
import sys

import pytest
from safetensors.torch import load_file

from unison import config
from unison.cli import main
from unison.history import read_jsonl

RUN = """
[data]
dataset = "xor"
[model]
hidden = [8]
activation = "tanh"
[train]
strategy = "periodic(every=epoch)"
workers = 2
backend = "threads"
epochs = 3
batch_size = 16
lr = 0.1
"""


@pytest.fixture
def run_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(RUN)
    return path


def test_train_writes_the_run_directory(run_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", str(run_file), "--out", str(out), "--set", "train.epochs=2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "history.jsonl", "model.safetensors",
                                                     "summary.txt"]
    resolved = config.load(out / "config.toml")
    assert resolved.train.epochs == 2 and resolved.train.strategy.spec() == "periodic"
    assert resolved.model.hidden == (8,)
    history = read_jsonl(out / "history.jsonl")
    assert [r["epoch"] for r in history] == [1.0, 2.0]
    state = load_file(out / "model.safetensors")
    assert state["0.weight"].shape == (8, 2)
    printed = capsys.readouterr().out
    assert "final validation accuracy" in printed and str(out) in printed
    assert not list(tmp_path.glob(".out.*"))  # no scratch directory left behind


def test_every_training_option_reaches_fit_from_a_run_file(run_file, tmp_path, capsys):
    out = tmp_path / "out"
    sets = ["train.strategy=diloco(every=4, merge=median)", "train.workers=3", "train.partition=dirichlet(5)",
            "train.schedule=cosine", "train.penalty=l2(0.001)", "train.constraint=max_norm(2)",
            "train.momentum=0.9", "train.nesterov=true", "train.epochs=2"]
    assert main(["train", str(run_file), "--out", str(out), "--quiet"] + [f"--set={s}" for s in sets]) == 0
    saved = config.load(out / "config.toml").train
    assert saved.strategy.spec() == "diloco(every=4, merge=median)" and saved.partition.spec() == "dirichlet(alpha=5)"
    assert (saved.schedule.spec(), saved.penalty.spec(), saved.constraint.spec()) == \
        ("cosine", "l2(strength=0.001)", "max_norm(c=2)")
    history = read_jsonl(out / "history.jsonl")
    assert history[-1]["lr"] < history[0]["lr"] < 0.1  # the cosine schedule ran
    weights = load_file(out / "model.safetensors")
    assert float(weights["0.weight"].norm(dim=1).max()) <= 2 + 1e-5  # and the constraint


def test_existing_run_directory_is_kept_unless_overwrite(run_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["train", str(run_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"
    assert main(["train", str(run_file), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_a_run_that_fails_in_its_workers_leaves_the_old_directory_intact(run_file, tmp_path, capsys,
                                                                         monkeypatch):
    out = tmp_path / "out"
    assert main(["train", str(run_file), "--out", str(out)]) == 0
    before = (out / "model.safetensors").read_bytes()
    from unison.engine import loop

    real_run = loop.run

    def fails_midway(job, comm, *args):
        if comm.rank == 1:
            raise RuntimeError("disk on fire")
        return real_run(job, comm, *args)

    monkeypatch.setattr(loop, "run", fails_midway)
    assert main(["train", str(run_file), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "worker 1 failed: RuntimeError: disk on fire" in err
    assert (out / "model.safetensors").read_bytes() == before
    assert not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("args, words", [
    (["--set", "train.lr=0"], ["lr=0", "finite number"]),
    (["--set", "train.workers=-3"], ["workers=-3"]),
    (["--set", "train.strategy=gossip"], ["strategy='gossip'", "'periodic'"]),
    (["--set", "train.speed=9"], ["unknown setting train.speed", "accepted:", "lr"]),
    (["--set", "optim.lr=1"], ["--set key='optim.lr'"]),
    (["--set", "noequals"], ["--set='noequals'", "key=value"]),
    (["--set", "data.dataset=mnist"], ["data='mnist'", "'digits'"]),
])
def test_bad_settings_print_one_line_and_exit_2(run_file, tmp_path, capsys, args, words):
    assert main(["train", str(run_file), "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unison: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err
    assert not (tmp_path / "x").exists()


def test_bad_toml_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = ")
    assert main(["train", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "none.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_python_dash_m_unison_usage_error_is_one_line_no_traceback():
    done = subprocess.run([sys.executable, "-m", "unison", "train"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


@pytest.mark.slow
def test_demo_xor_learns_to_100_percent():
    done = subprocess.run([sys.executable, "-m", "unison", "demo", "xor"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "4 worker(s)" in done.stdout and "final validation accuracy 100.00%" in done.stdout
    assert done.stdout.count("(right)") == 4
