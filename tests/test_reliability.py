"""fit()'s reliability rules: one writer per checkpoint folder, the user's callables failing
before any worker starts, the seed's range, fit(label=), the model file's mode."""

import errno
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import unison
from unison import checkpoint as checkpoints
from unison.engine import loop
from unison.errors import CheckpointError, ConfigError
from unison.models import mlp


@pytest.fixture
def nothing_trains(monkeypatch):
    """Fail the test if a worker's training loop starts."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started for input that should have been refused")
    monkeypatch.setattr(loop, "run", refuse)


def fit(model, data, **kwargs):
    settings = dict(backend="threads", workers=2, epochs=1, batch_size=16, progress=False)
    return unison.fit(model, data, **(settings | kwargs))


def write_lock(directory, pid):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / checkpoints.LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_writer_of_a_checkpoint_folder_is_refused_naming_the_first(blobs, small_model, tmp_path,
                                                                             nothing_trains):
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path / "ckpt", first.pid)
        with pytest.raises(CheckpointError) as info:
            fit(small_model, blobs, checkpoint_every=1, checkpoint_dir=str(tmp_path / "ckpt"))
        assert f"process {first.pid}" in str(info.value) and "checkpoint_dir=" in str(info.value)
        with pytest.raises(CheckpointError, match=f"process {first.pid}"):  # resuming is refused too
            fit(small_model, blobs, checkpoint_every=1, checkpoint_dir=str(tmp_path / "ckpt"), resume=True)
        assert json.loads((tmp_path / "ckpt" / checkpoints.LOCK).read_text())["pid"] == first.pid  # kept
    finally:
        first.kill()
        first.wait()


def test_a_run_in_this_process_holding_the_folder_is_refused_too(blobs, small_model, tmp_path, nothing_trains):
    held = checkpoints.lock(tmp_path / "ckpt")
    try:
        with pytest.raises(CheckpointError, match=f"process {os.getpid()}"):
            fit(small_model, blobs, checkpoint_every=1, checkpoint_dir=str(tmp_path / "ckpt"))
    finally:
        checkpoints.unlock(tmp_path / "ckpt")
    assert not held.exists()


def test_a_lock_that_a_full_disk_kept_from_being_written_is_not_left_behind(tmp_path, monkeypatch):
    # bench/chaos.py found it: an empty writer.lock (created, then ENOSPC) refused every later run
    # as "being written by another process (its lock file cannot be read)", even once space was freed
    real_write = os.write

    def full(handle, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpoints.os, "write", full)
    with pytest.raises(OSError, match="No space left"):
        checkpoints.lock(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / checkpoints.LOCK).exists()
    monkeypatch.setattr(checkpoints.os, "write", real_write)
    checkpoints.lock(tmp_path / "ckpt")  # space freed: the next run takes the folder
    assert json.loads((tmp_path / "ckpt" / checkpoints.LOCK).read_text())["pid"] == os.getpid()
    checkpoints.unlock(tmp_path / "ckpt")


def test_a_stale_lock_is_taken_over_with_a_warning_and_released_at_the_end(blobs, small_model, tmp_path):
    gone = dead_pid()
    write_lock(tmp_path / "ckpt", gone)
    with pytest.warns(checkpoints.CheckpointWarning, match=f"lock of process {gone}"):
        result = fit(small_model, blobs, checkpoint_every=1, checkpoint_dir=str(tmp_path / "ckpt"))
    assert result.history and checkpoints.steps_on_disk(tmp_path / "ckpt")  # it trained and checkpointed
    assert not (tmp_path / "ckpt" / checkpoints.LOCK).exists()
    # the lock file is not part of any checkpoint: the newest one still loads, and a resume works
    assert checkpoints.load_latest(tmp_path / "ckpt") is not None
    resumed = fit(small_model, blobs, epochs=2, checkpoint_every=1, checkpoint_dir=str(tmp_path / "ckpt"),
                  resume=True)
    assert resumed.history[-1]["epoch"] == 2.0


def test_the_lock_is_released_when_the_run_is_refused_or_fails(blobs, small_model, tmp_path, monkeypatch):
    fit(small_model, blobs, checkpoint_every=1, checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(ConfigError, match="already holds checkpoints"):  # refused after the lock was taken
        fit(small_model, blobs, checkpoint_every=1, checkpoint_dir=str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt" / checkpoints.LOCK).exists()

    def fails(job, comm, *args):
        raise RuntimeError("worker fails")
    monkeypatch.setattr(loop, "run", fails)
    with pytest.raises(unison.errors.WorkerError):
        fit(small_model, blobs, checkpoint_every=1, checkpoint_dir=str(tmp_path / "other"))
    assert not (tmp_path / "other" / checkpoints.LOCK).exists()


def failing_model():
    raise ValueError("no such layer: Conv7d")


def failing_optimizer(params):
    raise KeyError("betas")


def failing_loss(output, target):
    raise RuntimeError("shape mismatch in my loss")


@pytest.mark.parametrize("kwargs, words", [
    ({"model": failing_model}, ["model factory", "failing_model", "ValueError: no such layer: Conv7d"]),
    ({"optimizer": failing_optimizer}, ["optimizer factory", "failing_optimizer", "KeyError: 'betas'"]),
    ({"loss": failing_loss}, ["loss callable", "failing_loss", "RuntimeError: shape mismatch in my loss"]),
])
def test_a_user_callable_that_raises_is_a_config_error_naming_it(blobs, small_model, nothing_trains, kwargs, words):
    model = kwargs.pop("model", small_model)
    with pytest.raises(ConfigError) as info:
        fit(model, blobs, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_a_seed_of_2_to_the_64_is_a_config_error(blobs, small_model, nothing_trains):
    with pytest.raises(ConfigError, match=r"seed=18446744073709551616.*\[0, 9223372036854775807\]"):
        fit(small_model, blobs, seed=2**64)


def test_fit_label_names_the_csv_column_of_the_labels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3)).round(4)
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    last, first = tmp_path / "last.csv", tmp_path / "first.csv"
    last.write_text("a,b,c,kind\n" + "".join(f"{r[0]},{r[1]},{r[2]},{k}\n" for r, k in zip(x, y)))
    first.write_text("kind,a,b,c\n" + "".join(f"{k},{r[0]},{r[1]},{r[2]}\n" for r, k in zip(x, y)))

    def model():
        return mlp(3, [8], 2)

    reference = fit(model, str(last), epochs=2)             # the label is the last column by default
    labelled = fit(model, str(first), epochs=2, label="kind")
    for name, value in reference.model.state_dict().items():
        assert torch.equal(value, labelled.model.state_dict()[name]), name


def test_model_safetensors_respects_the_umask(blobs, small_model, tmp_path):
    previous = os.umask(0o022)
    try:
        fit(small_model, blobs, log_dir=tmp_path / "log")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "log").iterdir()}
    assert modes["model.safetensors"] == 0o644 and modes["history.jsonl"] == 0o644, modes
