"""Checkpoints made hostile: a crafted manifest or state.json is refused with CheckpointError
(never a read outside the checkpoint, a hang or a traceback), and a failed save leaves nothing.

Each test builds a real checkpoint, tampers with one thing and reseals the manifest (recomputes
its checksums), so that only the tampered thing is wrong."""

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_tensors

from unison import checkpoint as files
from unison.errors import CheckpointError

SECRET = b"outside-secret-" * 823  # 12345 bytes: neither its content nor its size may leak
STATE = {"world_size": 2, "steps_per_epoch": 6, "epoch_end": False, "samples_seen": 96, "rounds": 3,
         "history": [{"step": 6, "wall_s": 0.5}], "config": {"lr": 0.1}, "data": "ab" * 32}


def replica_blob(value, meta=None):
    meta = {"optimizer": {"param_groups": [{"lr": 0.1}], "scalars": {}}, "bytes_sent": 12,
            "nan": {"rollbacks": 0, "discarded": 0}} if meta is None else meta
    return save_tensors({"optimizer/0/momentum_buffer": torch.full((3,), value)},
                        metadata={files.REPLICA_META: json.dumps(meta)})


def write(directory, step, state=None, replicas=None, value=None):
    value = float(step) if value is None else value
    replicas = [replica_blob(value), replica_blob(-value)] if replicas is None else replicas
    return files.save(directory, step, STATE if state is None else state, {"w": torch.full((4, 2), value)},
                      replicas, keep=5)


def reseal(path, change=lambda manifest: None):
    """Recompute the manifest's checksums of the regular files it lists, then ``change`` it."""
    manifest = json.loads((path / files.MANIFEST).read_text())
    for name, entry in manifest["files"].items():
        file = path / name
        if file.is_file() and not file.is_symlink():
            data = file.read_bytes()
            entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    change(manifest)
    (path / files.MANIFEST).write_text(json.dumps(manifest))


def refused(path):
    """The CheckpointError load() raises, checked to name the checkpoint and leak nothing."""
    with pytest.raises(CheckpointError) as info:
        files.load(path)
    message = str(info.value)
    assert str(path) in message and "outside-secret" not in message and f"{len(SECRET)} bytes" not in message
    return message


def entry_of(data):
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def tamper_state(path, key, value):
    state = json.loads((path / "state.json").read_text())
    state[key] = value
    (path / "state.json").write_text(json.dumps(state))
    reseal(path)


def disk_full_on(monkeypatch, call):
    real_write, calls = files._write, []

    def fills_the_disk(path, data):  # the ``call``-th file is half written, then ENOSPC
        calls.append(path)
        if len(calls) == call:
            real_write(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)
    monkeypatch.setattr(files, "_write", fills_the_disk)


@pytest.mark.parametrize("step", [6, 4], ids=["newer", "same-step"])
def test_a_failed_save_leaves_nothing_behind_and_the_older_checkpoint_intact(tmp_path, monkeypatch, step):
    write(tmp_path, 4)
    disk_full_on(monkeypatch, call=2)
    with pytest.raises(OSError) as info:
        write(tmp_path, step, value=-1.0)
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000004"]  # no .ckpt-*.tmp-PID
    loaded = files.load(tmp_path / "ckpt-000000004")
    assert loaded.step == 4 and torch.equal(loaded.model["w"], torch.full((4, 2), 4.0))


def test_a_save_that_fails_to_rename_keeps_the_checkpoint_it_was_replacing(tmp_path, monkeypatch):
    write(tmp_path, 4)
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".ckpt-000000004.tmp"):
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(self, target)
    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError):
        write(tmp_path, 4, value=-1.0)  # a resumed run at step 4 again: it replaces ckpt-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000004"]
    assert torch.equal(files.load(tmp_path / "ckpt-000000004").model["w"], torch.full((4, 2), 4.0))


@pytest.mark.parametrize("where", ["relative", "absolute"])
@pytest.mark.parametrize("honest", [True, False], ids=["true-checksum", "wrong-size"])
def test_a_manifest_naming_a_file_outside_the_checkpoint_is_refused_unread(tmp_path, where, honest):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(SECRET)
    path = write(tmp_path / "run", 5)
    name = "../../outside.bin" if where == "relative" else str(outside)
    entry = entry_of(SECRET) if honest else {"sha256": "0" * 64, "bytes": 7}
    reseal(path, lambda manifest: manifest["files"].__setitem__(name, entry))
    assert "not a file of this format" in refused(path)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("target", ["/dev/zero", "outside"])
def test_a_symlink_in_place_of_a_file_is_not_followed(tmp_path, target):
    (tmp_path / "outside.bin").write_bytes(SECRET)
    path = write(tmp_path / "run", 5)
    model = path / "model.safetensors"
    model.unlink()
    model.symlink_to("/dev/zero" if target == "/dev/zero" else tmp_path / "outside.bin")
    assert "model.safetensors is a symbolic link" in refused(path)


@pytest.mark.timeout(10)
def test_a_named_pipe_in_place_of_state_json_does_not_block(tmp_path):
    path = write(tmp_path, 5)
    (path / "state.json").unlink()
    os.mkfifo(path / "state.json")
    assert "state.json is a named pipe" in refused(path)


@pytest.mark.parametrize("change, expected", [
    (lambda m: m.__setitem__("files", list(m["files"])), "files must be an object"),
    (lambda m: m["files"].__setitem__("model.safetensors", "abc"), "'model.safetensors' must be a JSON object"),
    (lambda m: m["files"].__setitem__("notes.txt", entry_of(b"hello")), "'notes.txt', which is not a file"),
    (lambda m: m.__setitem__("step", "5"), "step must be an int >= 0"),
    (lambda m: m["files"]["state.json"].__setitem__("bytes", True), "bytes must be an int >= 0"),
], ids=["files-a-list", "entry-a-string", "unknown-name", "step-a-string", "bytes-a-bool"])
def test_a_malformed_manifest_is_refused_by_what_is_wrong(tmp_path, change, expected):
    path = write(tmp_path, 5)
    (path / "notes.txt").write_bytes(b"hello")
    reseal(path, change)
    assert expected in refused(path)


def test_a_checkpoint_whose_step_is_not_its_directory_name_is_refused(tmp_path):
    path = write(tmp_path, 5)
    tamper_state(path, "step", 9)  # manifest and state.json agree on step 9, in ckpt-000000005
    reseal(path, lambda m: m.__setitem__("step", 9))
    assert "MANIFEST.json is for step 9, the directory's name for step 5" in refused(path)


def test_a_replica_beyond_world_size_is_refused(tmp_path):
    path = write(tmp_path, 5)
    (path / "replica-2.safetensors").write_bytes(blob := replica_blob(2.0))
    reseal(path, lambda m: m["files"].__setitem__("replica-2.safetensors", entry_of(blob)))
    assert "'replica-2.safetensors', which is not a file of this format (with world_size=2)" in refused(path)


def test_an_oversized_manifest_is_refused_before_it_is_parsed(tmp_path):
    path = write(tmp_path, 5)
    manifest = (path / files.MANIFEST).read_bytes()
    (path / files.MANIFEST).write_bytes(manifest + b" " * (64 << 20))  # valid JSON, and 64 MiB
    message = refused(path)
    assert f"MANIFEST.json has more than {files.MANIFEST_LIMIT} bytes" in message


def test_a_too_deeply_nested_manifest_is_a_checkpoint_error(tmp_path):
    path = write(tmp_path, 5)
    (path / files.MANIFEST).write_bytes(b"[" * 100_000)  # RecursionError in json.loads
    assert "MANIFEST.json is not valid JSON" in refused(path)


@pytest.mark.parametrize("key, value", [
    ("world_size", "2"), ("world_size", -1), ("world_size", 10**9), ("history", {"step": 6}),
    ("history", [1, 2]), ("epoch_end", "no"), ("step", 5.0), ("samples_seen", -1), ("steps_per_epoch", 0),
    ("rounds", -3), ("config", ["lr", 0.1]), ("data", 5), ("format", "unison-checkpoint/0"),
])
def test_a_state_json_value_of_the_wrong_type_or_range_is_refused_by_name(tmp_path, key, value):
    path = write(tmp_path, 5)
    tamper_state(path, key, value)
    assert f"state.json: {key} must be" in refused(path)


@pytest.mark.parametrize("where, key, value", [
    ("state", "world_size", True), ("state", "rounds", False), ("state", "samples_seen", True),
    ("replica", "bytes_sent", True),
])
def test_a_bool_is_not_an_int(tmp_path, where, key, value):
    if where == "state":
        path = write(tmp_path, 5)
        tamper_state(path, key, value)
    else:  # written, and checksummed, by a writer that does not check the replicas' JSON
        meta = {"optimizer": {"param_groups": [], "scalars": {}}, "bytes_sent": value,
                "nan": {"rollbacks": 0, "discarded": 0}}
        path = write(tmp_path, 5, replicas=[replica_blob(1.0), replica_blob(2.0, meta)])
    assert f"{key} must be an int" in refused(path)


@pytest.mark.parametrize("meta, expected", [
    ([1, 2], "metadata must be a JSON object"),
    ({"optimizer": "sgd"}, "optimizer must be an object"),
    ({"optimizer": {"param_groups": [], "scalars": {"0": 1.0}}}, "optimizer must be an object"),
    ({"bytes_sent": -1}, "bytes_sent must be an int >= 0"),
    ({"nan": {"rollbacks": "0", "discarded": 0}}, "nan must be an object with ints"),
])
def test_a_replicas_metadata_is_checked(tmp_path, meta, expected):
    path = write(tmp_path, 5, replicas=[replica_blob(1.0), replica_blob(2.0, meta)])
    message = refused(path)
    assert "replica-1.safetensors's 'unison' metadata" in message and expected in message


def test_a_state_json_declared_beyond_the_limit_is_not_read(tmp_path):
    path = write(tmp_path, 5)
    reseal(path, lambda m: m["files"]["state.json"].__setitem__("bytes", 10**12))
    message = refused(path)
    assert "state.json has 1000000000000 bytes, over STATE_LIMIT=" in message  # and not read


def test_load_latest_falls_back_past_hostile_newer_checkpoints(tmp_path):
    write(tmp_path, 4)
    reseal(write(tmp_path, 6), lambda m: m.__setitem__("files", list(m["files"])))
    reseal(write(tmp_path, 8), lambda m: m["files"].__setitem__("state.json", "deadbeef"))
    with pytest.warns(files.CheckpointWarning) as warned:
        loaded = files.load_latest(tmp_path)
    assert loaded.step == 4 and torch.equal(loaded.model["w"], torch.full((4, 2), 4.0))
    assert ["ckpt-000000008" in str(w.message) for w in warned] == [True, False]
    assert all("previous checkpoint" in str(w.message) for w in warned)
    assert files.latest_valid_path(tmp_path).name == "ckpt-000000004"
    (tmp_path / "ckpt-000000004" / "state.json").unlink()
    os.mkfifo(tmp_path / "ckpt-000000004" / "state.json")
    with pytest.raises(CheckpointError, match="no usable checkpoint.*ckpt-000000004.*named pipe"), \
            pytest.warns(files.CheckpointWarning):
        files.load_latest(tmp_path)
    assert files.latest_valid_path(tmp_path) is None


@pytest.mark.parametrize("state, replicas, expected", [
    (STATE | {"world_size": "2"}, 2, "world_size must be an int"),
    (STATE | {"world_size": 3}, 2, "world_size is 3 but 2 replica files"),
    (STATE | {"history": {}}, 2, "history must be a list"),
])
def test_save_refuses_to_write_what_load_would_refuse(tmp_path, state, replicas, expected):
    with pytest.raises(CheckpointError, match=expected):
        write(tmp_path, 5, state=state, replicas=[replica_blob(float(r)) for r in range(replicas)])
    assert list(tmp_path.iterdir()) == []  # checked before anything is written
