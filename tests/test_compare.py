"""unison.compare and `unison compare|report`: every file written, the report rebuilt from the
histories alone, runs skipped or failed without ending the comparison, nothing overwritten."""

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch

import unison
from unison import config
from unison import comparison as compare_module
from unison.cli import main
from unison.errors import ConfigError, DataError
from unison.history import read_jsonl
from unison.strategies import Oneshot

FOUR = "single,sync,periodic(every=2),oneshot"
PLOTS = ["divergence_vs_round.png", "throughput.png", "time_to_target.png", "val_acc_vs_time.png",
         "val_loss_vs_epoch.png"]
RUN_FILES = ["config.toml", "history.jsonl", "model.safetensors", "summary.txt"]


def run_compare(tmp_path, blobs, small_model, **kwargs):
    # one attempt per run keeps these tests short; repeats are tested in test_compare_repeats.py
    kwargs = dict(strategies=FOUR, workers=2, backend="threads", epochs=3, batch_size=8, lr=0.1,
                  progress=False, out=tmp_path / "cmp", repeat=1) | kwargs
    return unison.compare(small_model, blobs, 0.25, **kwargs)


def test_compare_writes_every_file(tmp_path, blobs, small_model):
    result = run_compare(tmp_path, blobs, small_model)
    out = tmp_path / "cmp"
    assert result.out == out and list(result.results) == ["single", "sync", "periodic(every=2)", "oneshot"]
    dirs = ["oneshot", "periodic-every-2", "single", "sync"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.toml", "report.html", "summary.csv", "summary.md"] + PLOTS + dirs)
    for name in dirs:
        assert sorted(p.name for p in (out / name).iterdir()) == RUN_FILES
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 5 and "http" not in page  # self-contained
    assert str(result.winner) in page and "What was run" in page and "<table>" in page

    history = read_jsonl(out / "sync" / "history.jsonl")
    assert [r["epoch"] for r in history] == [1.0, 2.0, 3.0]
    for record in history:
        assert {"wall_s", "startup_s", "samples_per_s", "train_loss", "val_loss", "val_acc", "divergence",
                "comm_bytes"} <= set(record)
        assert record["samples_per_s"] == pytest.approx(record["samples"] / (record["wall_s"] - record["startup_s"]))
    # each run directory is a `unison train` run file; the top one a compare run file
    run = config.load(out / "periodic-every-2" / "config.toml")
    assert run.train.strategy.spec() == "periodic(every=2)" and run.train.workers == 2
    top = compare_module.load_settings(__import__("tomllib").loads((out / "config.toml").read_text()))[1]
    assert top["strategies"] == list(result.results) and top["reference"] == "single"
    assert top["runs"]["periodic(every=2)"] == {"dir": "periodic-every-2", "strategy": "periodic(every=2)",
                                                "attempts": [{"dir": "periodic-every-2", "seed": 0, "repeat": 1}]}

    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["strategy"] for r in rows] == list(result.results)
    assert [int(r["workers"]) for r in rows] == [1, 2, 2, 2]
    assert result.table() == (out / "summary.md").read_text()
    assert not list(tmp_path.glob(".cmp.*"))  # no scratch directory left


def test_report_rebuilds_the_same_summary_from_the_histories(tmp_path, blobs, small_model, capsys):
    run_compare(tmp_path, blobs, small_model)
    out = tmp_path / "cmp"
    written = {name: (out / name).read_bytes() for name in ["summary.md", "summary.csv", "report.html"] + PLOTS}
    for name in written:
        (out / name).unlink()
    assert main(["report", str(out)]) == 0
    for name, content in written.items():
        assert (out / name).read_bytes() == content, name
    printed = capsys.readouterr().out
    assert written["summary.md"].decode() in printed and "report.html" in printed


def test_variants_of_one_strategy_with_their_own_settings(tmp_path, blobs, small_model):
    result = run_compare(tmp_path, blobs, small_model, strategies={
        "shards": "oneshot", "same data": {"strategy": Oneshot(), "partition": "full", "lr": 0.05}})
    assert list(result.results) == ["shards", "same data"] and result.summary.reference == "shards"
    assert result.results["same data"].config.partition.spec() == "full"
    assert result.results["same data"].config.lr == 0.05
    run = config.load(tmp_path / "cmp" / "same-data" / "config.toml")
    assert run.train.partition.spec() == "full" and run.train.lr == 0.05


def test_an_existing_output_directory_is_kept_unless_overwrite(tmp_path, blobs, small_model, monkeypatch):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match="already exists.*overwrite"):
        run_compare(tmp_path, blobs, small_model)
    assert (out / "keep.txt").read_text() == "precious"
    run_compare(tmp_path, blobs, small_model, strategies="single", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "report.html").exists()


class _Teleports(Oneshot):
    name = "teleport"
    needs = frozenset({"teleportation"})


def test_every_registered_strategy_joins_and_one_the_backend_lacks_is_skipped(tmp_path, blobs, small_model,
                                                                              monkeypatch, capsys):
    monkeypatch.setitem(unison.strategies.REGISTRY, "teleport", _Teleports)
    assert compare_module.default_strategies()[-1] == "teleport"
    result = run_compare(tmp_path, blobs, small_model, strategies=None)
    assert list(result.results) == compare_module.default_strategies()[:-1]  # all but teleport
    assert {"hogwild", "diloco"} <= set(result.results)  # issue 3's strategies joined by themselves
    reason = "it needs teleportation, which backend 'threads' lacks"
    assert result.skipped == {"teleport": reason}
    assert f"teleport: skipped, {reason}" in capsys.readouterr().err
    assert f"- teleport: {reason}" in (tmp_path / "cmp" / "summary.md").read_text()


def test_a_run_whose_workers_fail_is_reported_and_the_others_go_on(tmp_path, blobs, small_model, monkeypatch):
    from unison.engine import loop

    real_run = loop.run

    def sync_fails(job, comm, *args):
        if job.strategy.name == "sync" and comm.rank == 1:
            raise RuntimeError("disk on fire")
        return real_run(job, comm, *args)

    monkeypatch.setattr(loop, "run", sync_fails)
    result = run_compare(tmp_path, blobs, small_model)
    assert list(result.results) == ["single", "periodic(every=2)", "oneshot"]
    assert list(result.skipped) == ["sync"]
    assert result.skipped["sync"].startswith("failed: worker 1 failed: RuntimeError: disk on fire")
    assert not (tmp_path / "cmp" / "sync").exists()


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started for bad input")
    monkeypatch.setattr(compare_module.api, "run", refuse)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"strategies": "single,gossip"}, ConfigError, ["strategy='gossip'", "'periodic'"]),
    ({"strategies": "sync,sync"}, ConfigError, ["'sync' is listed twice"]),
    ({"strategies": {"a": {"strategy": "sync", "colour": 1}}}, ConfigError, ["unknown option 'colour'", "partition"]),
    ({"strategies": []}, ConfigError, ["strategies=[]", "at least one"]),
    ({"target": 95}, ConfigError, ["target=95", "(0.0, 1.0]"]),
    ({"target_fraction": 0}, ConfigError, ["target_fraction=0"]),
    ({"lr": 0}, ConfigError, ["lr=0"]),
    ({"backend": "torchrun"}, ConfigError, ["backend='torchrun'", "'threads', 'processes'", "unison train"]),
    ({"label": "kind"}, DataError, ["label='kind'"]),
])
def test_bad_input_is_refused_before_training(tmp_path, blobs, small_model, no_training, kwargs, error, words):
    with pytest.raises(error) as info:
        run_compare(tmp_path, blobs, small_model, **kwargs)
    for word in words:
        assert word in str(info.value), str(info.value)
    assert not (tmp_path / "cmp").exists()


def test_validation_data_is_required(tmp_path, blobs, small_model, no_training):
    with pytest.raises(ConfigError, match="needs validation data"):
        unison.compare(small_model, blobs, backend="threads", out=tmp_path / "cmp")


def test_tensorboard_missing_is_a_clear_error_and_present_writes_scalars(tmp_path, blobs, small_model,
                                                                         monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'unison\[tensorboard\]'"):
        run_compare(tmp_path, blobs, small_model, tensorboard=True)

    written = []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, global_step, walltime):
            written.append((self.log_dir, tag, global_step))

        def close(self):
            pass

    monkeypatch.setattr(unison.history, "tensorboard_writer_class", lambda: FakeWriter)
    run_compare(tmp_path, blobs, small_model, strategies="single,sync", tensorboard=True)
    assert {(log_dir.rsplit("/", 1)[-1], tag) for log_dir, tag, _ in written} >= {
        ("single", "val_acc"), ("sync", "val_acc"), ("sync", "divergence"), ("sync", "samples_per_s")}
    assert {step for _, tag, step in written if tag == "val_acc"} == {9, 18, 27, 5, 10, 15}


@pytest.fixture
def csv_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 3
    x = torch.randn(3, 4, generator=g)[y] * 3 + torch.randn(120, 4, generator=g)
    path = tmp_path / "blobs.csv"
    rows = [",".join(f"{v:.4f}" for v in features) + f",{label}" for features, label in zip(x.tolist(), y.tolist())]
    path.write_text("a,b,c,d,kind\n" + "\n".join(rows) + "\n")
    return path


def test_cli_compare_on_a_csv_file(tmp_path, csv_file, capsys):
    out = tmp_path / "out"
    argv = ["compare", "--dataset", str(csv_file), "--strategies", "single,periodic(every=3, warmup=2)",
            "--backend", "threads", "--epochs", "2", "--set", "train.batch_size=8", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| periodic(every=3, warmup=2) | 2 |" in printed and f"report: {out / 'report.html'}" in printed
    settings = compare_module.load_settings(__import__("tomllib").loads((out / "config.toml").read_text()))
    assert settings[0].data.dataset == str(csv_file) and settings[0].train.batch_size == 8
    assert main(argv) == 2  # the directory exists now
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("args, words", [
    (["--strategies", "single,gossip"], ["strategy='gossip'"]),
    (["--target", "95"], ["target=95"]),
    (["--backend", "mpi"], ["backend='mpi'"]),
    (["--workers", "0"], ["workers=0"]),
    (["--dataset", "nowhere.csv"], ["nowhere.csv", "does not exist"]),
    (["--set", "compare.colour=1"], ["--set key='compare.colour'"]),
])
def test_cli_compare_bad_flags_print_one_line_and_exit_2(tmp_path, csv_file, capsys, args, words):
    argv = ["compare", "--dataset", str(csv_file), "--backend", "threads", "--out", str(tmp_path / "x"), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("unison: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err
    assert not (tmp_path / "x").exists()


def test_cli_compare_run_file_with_a_compare_table(tmp_path, csv_file, capsys):
    run_file = tmp_path / "run.toml"
    run_file.write_text(f'[data]\ndataset = "{csv_file}"\n[train]\nbackend = "threads"\nepochs = 2\nbatch_size = 8\n'
                        '[compare]\nstrategies = ["single", "oneshot"]\ntarget = 0.5\ncolour = "red"\n'
                        '[compare.runs."oneshot, same data"]\nstrategy = "oneshot"\npartition = "full"\n')
    assert main(["compare", str(run_file), "--out", str(tmp_path / "a")]) == 2
    assert "unknown setting compare.colour" in capsys.readouterr().err
    run_file.write_text(run_file.read_text().replace('colour = "red"\n', ""))
    assert main(["compare", str(run_file), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    table = (tmp_path / "a" / "summary.md").read_text()
    assert "time to 50.00% (s)" in table and "| oneshot, same data | 2 |" in table
    assert config.load(tmp_path / "a" / "oneshot-same-data" / "config.toml").train.partition.spec() == "full"
    # the resolved config.toml runs again as a run file
    assert main(["compare", str(tmp_path / "a" / "config.toml"), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert (tmp_path / "b" / "summary.md").read_text().count("\n|") == (tmp_path / "a" / "summary.md").read_text().count("\n|")


def test_report_on_a_directory_without_runs(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no run histories" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_compare_on_processes_from_the_command_line(tmp_path, csv_file):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "unison", "compare", "--dataset", str(csv_file), "--strategies",
                           "single,periodic(every=epoch)", "--epochs", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr
    # progress lines, not bars; the default measures each run five times, interleaved (A B, B A, A B, ...)
    assert "10 runs (2 strategies × 5 repeat(s) × 1 seed(s))" in done.stdout.splitlines()[1]
    assert "[2/10] periodic(every=epoch) (seed 0, repeat 1): final val acc" in done.stdout
    assert "[3/10] periodic(every=epoch) (seed 0, repeat 2)" in done.stdout
    assert "[10/10] periodic(every=epoch) (seed 0, repeat 5)" in done.stdout
    assert "epoch/s" not in done.stderr and "\r" not in done.stderr   # no tqdm bar off a terminal
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["strategy"], r["workers"]) for r in rows] == [("single", "1"), ("periodic(every=epoch)", "2")]
    # recorded, and part of the run's time (compare waits for the forkserver before the first run,
    # so the figure is a warm start; bench/startup.py measures how long that takes)
    assert 0 < float(rows[1]["startup_s"]) < float(rows[1]["wall_s"])
    assert np.isfinite(float(rows[1]["best"]))


def test_momentum_defaults_to_0_9_for_sgd_only(tmp_path, blobs, small_model):
    adam = run_compare(tmp_path, blobs, small_model, strategies="single", optimizer="adam", lr=0.01)
    assert adam.results["single"].config.momentum == 0.0
    sgd = run_compare(tmp_path, blobs, small_model, strategies="single,sync", out=tmp_path / "sgd",
                      weight_decay=0.01, timeout=60.0)  # other fit() settings reach every run
    for result in sgd.results.values():
        assert (result.config.momentum, result.config.weight_decay, result.config.timeout) == (0.9, 0.01, 60.0)


def test_report_on_a_train_run_directory(tmp_path, csv_file, capsys):
    run_file = tmp_path / "run.toml"
    run_file.write_text(f'[data]\ndataset = "{csv_file}"\n[train]\nstrategy = "sync"\nbackend = "threads"\n'
                        'epochs = 2\nbatch_size = 8\n')
    assert main(["train", str(run_file), "--out", str(tmp_path / "t"), "--quiet"]) == 0
    assert main(["report", str(tmp_path / "t")]) == 0
    assert "| sync | 2 | 2 |" in (tmp_path / "t" / "summary.md").read_text()
    assert (tmp_path / "t" / "report.html").exists()


def test_every_train_setting_is_a_fit_keyword_so_compare_can_pass_it_through():
    import inspect

    fit_parameters = inspect.signature(unison.fit).parameters
    assert set(compare_module.TRAIN_FIELDS) <= set(fit_parameters)


def test_an_unknown_training_setting_is_refused(tmp_path, blobs, small_model, no_training):
    with pytest.raises(ConfigError, match="no setting 'colour'.*weight_decay"):
        run_compare(tmp_path, blobs, small_model, colour="red")


def test_a_registered_strategy_that_needs_options_is_left_out_of_the_default_with_a_reason(
        tmp_path, blobs, small_model, monkeypatch, capsys):
    class NeedsOptions(Oneshot):
        name = "picky"

        def __init__(self, rate):
            pass

    monkeypatch.setitem(unison.strategies.REGISTRY, "picky", NeedsOptions)
    result = run_compare(tmp_path, blobs, small_model, strategies=None, epochs=1)
    assert "picky" not in result.results and "default options" in result.skipped["picky"]
    assert "picky: skipped, it cannot be built with its default options" in capsys.readouterr().err
