"""Checkpoints made hostile: a crafted manifest or state.json is refused with CheckpointError
(never a read outside the checkpoint, a hang or a traceback), and a failed save leaves nothing."""

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_tensors

from unison import checkpoint as files

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
