"""Checkpoint files: atomic writes, a manifest that catches corruption, no pickle, retention."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_tensors

from unison import checkpoint as files
from unison.errors import CheckpointError


def replica_blob(value: float) -> bytes:
    return save_tensors({"optimizer/0/momentum_buffer": torch.full((3,), value)},
                        metadata={files.REPLICA_META: json.dumps({"bytes_sent": 0})})


def write(directory, step, keep=2, value=None):
    value = float(step) if value is None else value
    return files.save(directory, step, {"world_size": 2, "note": "x"}, {"w": torch.full((4, 2), value)},
                      [replica_blob(value), replica_blob(-value)], keep=keep)


def test_a_checkpoint_round_trips_and_lists_every_file_in_its_manifest(tmp_path):
    path = write(tmp_path, 7)
    assert path.name == "ckpt-000000007"
    manifest = json.loads((path / files.MANIFEST).read_text())
    assert set(manifest["files"]) == {"model.safetensors", "state.json", "replica-0.safetensors",
                                      "replica-1.safetensors"}
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())
    loaded = files.load(path)
    assert loaded.step == 7 and loaded.state["note"] == "x"
    assert torch.equal(loaded.model["w"], torch.full((4, 2), 7.0))
    assert torch.equal(loaded.replicas[1]["optimizer/0/momentum_buffer"], torch.full((3,), -7.0))
    assert loaded.replica_meta[0] == {"bytes_sent": 0}
    for file in path.iterdir():  # tensors as safetensors, the rest JSON: nothing to unpickle
        assert file.suffix in (".safetensors", ".json")
        assert b"torch._utils" not in file.read_bytes() and not file.read_bytes().startswith(b"\x80")


@pytest.mark.parametrize("name", ["model.safetensors", "state.json", "replica-1.safetensors"])
def test_a_flipped_byte_is_detected_by_the_manifest(tmp_path, name):
    path = write(tmp_path, 3)
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        files.load(path)
    assert name in str(info.value) and "SHA-256" in str(info.value) and "corrupt" in str(info.value)


def test_truncated_and_incomplete_checkpoints_are_refused(tmp_path):
    path = write(tmp_path, 3)
    model = path / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        files.load(path)
    (path / files.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        files.load(path)


def test_the_newest_valid_checkpoint_is_used_and_a_corrupt_newer_one_reported(tmp_path):
    write(tmp_path, 4)
    newest = write(tmp_path, 8)
    (newest / "state.json").write_text("{}")
    with pytest.warns(files.CheckpointWarning, match="ckpt-000000008.*previous checkpoint"):
        loaded = files.load_latest(tmp_path)
    assert loaded.step == 4
    assert files.latest_valid_path(tmp_path).name == "ckpt-000000004"
    (tmp_path / "ckpt-000000004" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no usable checkpoint"), pytest.warns(files.CheckpointWarning):
        files.load_latest(tmp_path)
    assert files.load_latest(tmp_path / "none") is None


def test_only_the_newest_k_are_kept_and_an_abandoned_newer_one_is_replaced(tmp_path):
    for step in (2, 4, 6, 8):
        write(tmp_path, step, keep=3)
    assert files.steps_on_disk(tmp_path) == [8, 6, 4]
    write(tmp_path, 6, keep=3, value=-1.0)  # a resumed run passes step 6 again: 8 was abandoned
    assert files.steps_on_disk(tmp_path) == [6, 4]
    assert files.load(tmp_path / "ckpt-000000006").model["w"][0, 0] == -1.0


def test_optimizer_state_is_stored_as_tensors_and_json_and_training_continues_exactly():
    def train(model, optimizer, steps):
        for i in range(steps):
            optimizer.zero_grad()
            model(torch.full((2, 3), float(i))).pow(2).sum().backward()
            optimizer.step()

    for make in (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda p: torch.optim.Adam(p, lr=0.01)):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        optimizer = make(model.parameters())
        train(model, optimizer, 3)
        tensors, meta = files.flatten_optimizer(optimizer.state_dict(), "opt/")
        json.dumps(meta)  # plain JSON
        copy = torch.nn.Linear(3, 2)
        copy.load_state_dict(model.state_dict())
        restored = make(copy.parameters())
        restored.load_state_dict(files.unflatten_optimizer(tensors, json.loads(json.dumps(meta)), "opt/"))
        train(model, optimizer, 3)
        train(copy, restored, 3)
        assert torch.equal(model.weight, copy.weight)


def test_an_optimizer_setting_that_needs_pickle_is_refused_by_name():
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    optimizer.param_groups[0]["schedule"] = object()
    with pytest.raises(CheckpointError, match="'schedule'.*without pickle"):
        files.flatten_optimizer(optimizer.state_dict(), "")


KILLED_WRITER = """
import sys, time, torch
from unison import checkpoint as files
sys.path.insert(0, {tests!r})
from test_checkpoint import write
write({directory!r}, 1)
real_write = files._write
def stalls_halfway(path, data):
    real_write(path, data[: len(data) // 2])
    print("writing", flush=True)
    time.sleep(60)
files._write = stalls_halfway
write({directory!r}, 2)
"""


def test_killing_the_writer_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    directory = tmp_path / "ckpt"
    script = KILLED_WRITER.format(tests=str(Path(__file__).parent), directory=str(directory))
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"  # mid-save, a file half written
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    finally:
        writer.kill()
        writer.stdout.close()
    assert writer.returncode == -signal.SIGKILL
    assert any(p.name.startswith(".ckpt-000000002.tmp") for p in directory.iterdir())
    assert files.steps_on_disk(directory) == [1]
    loaded = files.load_latest(directory)
    assert loaded.step == 1 and torch.equal(loaded.model["w"], torch.full((4, 2), 1.0))
    write(directory, 3)  # the next save clears the interrupted one's leftovers
    assert sorted(p.name for p in directory.iterdir()) == ["ckpt-000000001", "ckpt-000000003"]


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint_under_its_name(tmp_path, monkeypatch):
    """Pruning removes an old checkpoint file by file; killed midway (found by bench/chaos.py),
    what is left must not look like a checkpoint, and the next save clears it."""
    write(tmp_path, 1)
    write(tmp_path, 2)
    real_rmtree = files.shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        next(Path(path).glob("*.json")).unlink()  # one file gone, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(files.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        files.prune(tmp_path, keep=1, newest=2)
    assert files.steps_on_disk(tmp_path) == [2]
    assert files.load(tmp_path / files.directory_name(2)).step == 2
    monkeypatch.setattr(files.shutil, "rmtree", real_rmtree)
    write(tmp_path, 3, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert files.steps_on_disk(tmp_path) == [3, 2]
