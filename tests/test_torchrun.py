"""torchrun: `torchrun -m unison train` runs the same job in torchrun's process group."""

import pytest

import unison

from torchrun_runs import MOONS_RUN, assert_saved_model_equals, moons_on_threads, torchrun_train

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(240)]

def test_torchrun_train_equals_threads(tmp_path):
    done, out = torchrun_train(MOONS_RUN, tmp_path)
    assert "backend=torchrun" in done.stdout and "final validation accuracy" in done.stdout
    assert '"torchrun"' in (out / "config.toml").read_text()

    expected = moons_on_threads(workers=2)
    assert_saved_model_equals(out, expected)
    history = unison.history.read_jsonl(out / "history.jsonl")
    assert [r["step"] for r in history] == [r["step"] for r in expected.history]
    assert history[-1]["val_acc"] == expected.history[-1]["val_acc"]


def test_torchrun_backend_outside_torchrun_is_refused(blobs, small_model, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(unison.ConfigError, match="torchrun's environment"):
        unison.fit(small_model, blobs, backend="torchrun")


def test_more_torchrun_processes_than_cuda_devices_is_refused_before_nccl_starts(monkeypatch):
    import torch

    from unison.comm import torch_dist
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(unison.errors.WorkerError, match=r"started 2 processes on this node .* 1 CUDA device.*"
                                                        r"--nproc-per-node 1"):
        torch_dist.join_from_environment(timeout=5)


def test_a_group_that_never_forms_is_a_peer_failure_naming_the_rank_not_a_store_traceback(monkeypatch):
    import socket

    from unison.comm import torch_dist
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                        "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    with pytest.raises(unison.errors.WorkerError, match=r"rank 1 could not form the group of 2 processes within 2 s"):
        torch_dist.join_from_environment(timeout=2)
