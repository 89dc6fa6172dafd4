"""`unison train|compare` failing: one line on stderr and exit status 2, found before training;
what killed runs leave next to --out; a restarted torchrun group whose run is complete."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from unison import api, launch, rundir
from unison.cli import main
from unison.engine import loop

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
epochs = 2
batch_size = 16
lr = 0.1
"""


@pytest.fixture
def run_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(RUN)
    return path


@pytest.fixture
def nothing_trains(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started for a run that should have been refused")
    monkeypatch.setattr(loop, "run", refuse)


def one_error_line(capsys, *words):
    err = capsys.readouterr().err
    assert err.startswith("unison: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err
    return err


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_run_file_that_is_a_folder_is_one_line(tmp_path, capsys, command, nothing_trains):
    (tmp_path / "run.toml").mkdir()
    assert main([command, str(tmp_path / "run.toml"), "--out", str(tmp_path / "out")]) == 2
    one_error_line(capsys, "run.toml", "is a directory")


def test_out_root_with_overwrite_is_refused_before_training(run_file, capsys, nothing_trains):
    assert main(["train", str(run_file), "--out", "/", "--overwrite"]) == 2
    one_error_line(capsys, "out='/'", "filesystem root")


def test_a_seed_of_2_to_the_64_is_one_line(run_file, tmp_path, capsys, nothing_trains):
    assert main(["train", str(run_file), "--out", str(tmp_path / "out"), "--set", f"train.seed={2**64}"]) == 2
    one_error_line(capsys, "seed=18446744073709551616")


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder on a read-only filesystem (a tmpfs mounted ro: root ignores permission bits)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_out_on_a_read_only_filesystem_is_refused_before_training(run_file, read_only_folder, capsys,
                                                                  nothing_trains):
    assert main(["train", str(run_file), "--out", str(read_only_folder / "run")]) == 2
    one_error_line(capsys, "read-only filesystem")
    assert main(["train", str(run_file), "--out", str(read_only_folder / "deeper" / "run")]) == 2
    one_error_line(capsys, "read-only filesystem")


def test_an_os_error_during_a_command_is_one_line_naming_the_path(run_file, tmp_path, capsys, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "history.jsonl"))
    monkeypatch.setattr(api, "run", disk_full)
    assert main(["train", str(run_file), "--out", str(tmp_path / "out")]) == 2
    one_error_line(capsys, "history.jsonl", "No space left on device")


# A subprocess: pytest records warnings itself, so only there would a stray one reach stderr.
WARNS_THEN_FAILS = """
import sys, warnings
from unison import api
from unison.cli import main
from unison.errors import ConfigError

def fails(*args, **kwargs):
    warnings.warn("overflow encountered in exp", RuntimeWarning)
    raise ConfigError("lr=1e9 is far too large")
api.run = fails
sys.exit(main(["train", sys.argv[1], "--out", sys.argv[2]]))
"""


def test_warnings_before_the_error_print_nothing_but_the_error(run_file, tmp_path):
    done = subprocess.run([sys.executable, "-W", "always", "-c", WARNS_THEN_FAILS, str(run_file),
                           str(tmp_path / "out")], capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert done.returncode == 2
    assert done.stderr == "unison: error: lr=1e9 is far too large\n", done.stderr


def test_a_stale_old_copy_next_to_out_is_reported_and_removed(run_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", str(run_file), "--out", str(out)]) == 0
    stale_old, stale_partial = tmp_path / f".out.old-{dead_pid()}", tmp_path / f".out.partial-{dead_pid()}"
    stale_old.mkdir()
    stale_partial.mkdir()
    unfinished = rundir.partial_dir(tmp_path / "other")  # an unfinished run with checkpoints: kept
    unfinished.mkdir()
    capsys.readouterr()
    assert main(["train", str(run_file), "--out", str(out), "--overwrite"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("unison: warning:")]
    assert any(str(stale_old) in line for line in warned) and any(str(stale_partial) in line for line in warned)
    assert not stale_old.exists() and not stale_partial.exists() and unfinished.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial", "out", "run.toml"]


def test_an_old_copy_that_is_the_only_copy_is_put_back(tmp_path):
    out = tmp_path / "out"
    old = tmp_path / f".out.old-{dead_pid()}"  # killed between replace_dir's two renames
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"the old run")
    with pytest.warns(rundir.RunDirWarning, match="put back"):
        rundir.check_free(out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == b"the old run" and not old.exists()
    live = tmp_path / f".out.old-{os.getpid()}"  # a live process's: not touched
    live.mkdir()
    rundir.check_free(out, overwrite=True)
    assert live.exists()


def test_a_plain_file_as_out_with_overwrite_is_replaced_without_leftovers(run_file, tmp_path):
    out = tmp_path / "out"
    out.write_text("not a run")
    assert main(["train", str(run_file), "--out", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run.toml"]


def test_a_restarted_group_whose_run_was_published_exits_0(run_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    sets = ["--set", "train.checkpoint_every=1"]
    assert main(["train", str(run_file), "--out", str(out), *sets, "--quiet"]) == 0
    published = load_file(out / "model.safetensors")
    capsys.readouterr()
    # a rank died after rank 0 published: the restarted group finds the run complete
    monkeypatch.setattr(type(launch.get("threads")), "restarted", lambda self: True)
    monkeypatch.setattr(loop, "run", lambda *a, **k: pytest.fail("the complete run was trained again"))
    assert main(["train", str(run_file), "--out", str(out), *sets, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "already complete" in captured.err and str(out) in captured.out
    result, _ = api.train(__import__("unison").config.load(run_file, sets[1:]), out=out, progress=False)
    for name, value in published.items():
        assert (result.model.state_dict()[name] == value).all()
    assert load_file(out / "model.safetensors").keys() == published.keys()  # untouched
