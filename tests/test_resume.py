"""Checkpoints and resume on threads: a run continued from any of its checkpoints ends with the
same model and history as the run never interrupted."""

import json
import shutil
from dataclasses import dataclass

import pytest
import torch

import unison
from unison import checkpoint as files
from unison.errors import CheckpointError, ConfigError
from unison.partitions import Explicit
from unison.strategies import Periodic

from reference import max_abs_diff

TOL = 1e-6


def fit(model, data, **kwargs):
    kwargs = {"backend": "threads", "workers": 2, "epochs": 3, "batch_size": 8, "lr": 0.1,
              "progress": False} | kwargs
    return unison.fit(model, data, **kwargs)


def interrupted_at(source, target, step):
    """A copy of a checkpoint directory as a run that stopped after ``step`` would have left it."""
    target.mkdir()
    for kept in files.steps_on_disk(source):
        if kept <= step:
            shutil.copytree(source / files.directory_name(kept), target / files.directory_name(kept))
    return target


def same_history(resumed, uninterrupted):
    assert len(resumed) == len(uninterrupted)
    for a, b in zip(resumed, uninterrupted):
        a, b = dict(a), dict(b)
        # clocks, not results; and unison's own collectives, which a resumed process counts afresh
        for timing in ("wall_s", "startup_s", "samples_per_s", "comm_s", "bookkeeping"):
            a.pop(timing, None), b.pop(timing, None)
        assert a.pop("collectives", None) == b.pop("collectives", None)  # the strategy's: the same
        assert a == pytest.approx(b, rel=1e-6)


@pytest.mark.parametrize("case", ["periodic-momentum", "sync-adam", "periodic-average-batchnorm",
                                  "explicit-uneven", "warmup", "diloco-cosine-penalty", "scaffold-uneven",
                                  "scaffold-gradient-batchnorm", "fednova-momentum", "diloco-adam", "diloco-yogi"])
def test_resuming_from_any_checkpoint_equals_the_uninterrupted_run(blobs, tmp_path, case):
    torch.manual_seed(0)
    model = unison.models.mlp(8, [16], 3, batchnorm=case.endswith("batchnorm"))
    kwargs = {
        "periodic-momentum": dict(strategy=Periodic(every=4), momentum=0.9),
        "sync-adam": dict(strategy="sync", optimizer="adam", lr=0.01),
        "periodic-average-batchnorm": dict(strategy=Periodic(every=2, optimizer_state="average"), momentum=0.9,
                                           batch_size=16),
        "explicit-uneven": dict(strategy=Periodic(every=3), momentum=0.5,
                                partition=Explicit([list(range(0, 60)), list(range(60, 96))])),
        "warmup": dict(strategy=Periodic(every=4, warmup=7), momentum=0.9),
        # diloco's θ and outer momentum live in strategy_state; the schedule is a function of the step
        "diloco-cosine-penalty": dict(strategy="diloco(every=4, merge=median)", momentum=0.9, workers=3,
                                      schedule="cosine(warmup=3)", penalty="l2(0.01)", constraint="max_norm(2)"),
        # control variates, local step counts and the outer moments live in strategy_state
        "scaffold-uneven": dict(strategy="scaffold(every=3)", momentum=0.5,
                                partition=Explicit([list(range(0, 60)), list(range(60, 96))])),
        "scaffold-gradient-batchnorm": dict(strategy="scaffold(every=2, init=gradient)", batch_size=16),
        "fednova-momentum": dict(strategy="fednova(every=3)", momentum=0.9,
                                 partition=Explicit([list(range(0, 60)), list(range(60, 96))])),
        "diloco-adam": dict(strategy="diloco(every=4, outer=adam, outer_lr=0.05)", momentum=0.9),
        "diloco-yogi": dict(strategy="diloco(every=4, outer=yogi, outer_lr=0.05)", workers=3),
    }[case] | {"val": (blobs[0][:24], blobs[1][:24])}
    everything = tmp_path / "all"
    uninterrupted = fit(model, blobs, checkpoint_dir=everything, keep_checkpoints=100, **kwargs)
    steps = sorted(files.steps_on_disk(everything))
    assert len(steps) == len(uninterrupted.history) >= 3
    assert max_abs_diff(uninterrupted.model, fit(model, blobs, **kwargs).model) == 0  # checkpoints change nothing
    for step in (steps[0], steps[len(steps) // 2], steps[-1]):
        resumed = fit(model, blobs, checkpoint_dir=interrupted_at(everything, tmp_path / f"at-{step}", step),
                      resume=True, **kwargs)
        assert max_abs_diff(resumed.model, uninterrupted.model) <= TOL, step
        same_history(resumed.history, uninterrupted.history)


def test_a_corrupt_newest_checkpoint_is_reported_and_the_previous_one_used(blobs, small_model, tmp_path):
    kwargs = dict(strategy=Periodic(every=4), momentum=0.9)
    uninterrupted = fit(small_model, blobs, checkpoint_dir=tmp_path / "all", keep_checkpoints=100, **kwargs)
    directory = interrupted_at(tmp_path / "all", tmp_path / "run", 12)
    newest = directory / "ckpt-000000012" / "replica-1.safetensors"
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.warns(files.CheckpointWarning, match="ckpt-000000012.*SHA-256"):
        resumed = fit(small_model, blobs, checkpoint_dir=directory, resume=True, **kwargs)
    assert max_abs_diff(resumed.model, uninterrupted.model) <= TOL
    assert files.steps_on_disk(directory) == [18, 16]  # the corrupt one was replaced, then pruned


def test_checkpoints_are_kept_k_deep_and_a_duration_schedule_works(blobs, small_model, tmp_path):
    fit(small_model, blobs, strategy=Periodic(every=2), checkpoint_dir=tmp_path / "a", checkpoint_every=3)
    assert files.steps_on_disk(tmp_path / "a") == [18, 12]  # rounds 3, 6 (steps 6, 12) and the end; keep 2
    fit(small_model, blobs, strategy=Periodic(every=2), checkpoint_dir=tmp_path / "b", checkpoint_every="1h")
    assert files.steps_on_disk(tmp_path / "b") == [18]  # only the end
    fit(small_model, blobs, strategy=Periodic(every=2), checkpoint_dir=tmp_path / "c",
        checkpoint_every="0.000001s", keep_checkpoints=20)
    assert files.steps_on_disk(tmp_path / "c") == list(range(18, 0, -2))


def test_a_checkpoint_holds_what_resuming_needs(blobs, small_model, tmp_path):
    result = fit(small_model, blobs, strategy=Periodic(every=4), momentum=0.9, checkpoint_dir=tmp_path, seed=3)
    loaded = files.load(tmp_path / "ckpt-000000016")
    assert loaded.state["config"]["strategy"] == "periodic(every=4)" and loaded.state["config"]["seed"] == 3
    assert [r["step"] for r in loaded.state["history"]] == [4, 8, 12, 16]
    for rank in (0, 1):
        assert {"optimizer/0/momentum_buffer", "rng/cpu"} <= loaded.replicas[rank].keys()
        assert loaded.replica_meta[rank]["optimizer"]["param_groups"][0]["lr"] == 0.1
    final = files.load(tmp_path / "ckpt-000000018").model  # the merged model, as fit() returned it
    assert all(torch.equal(final[k], v) for k, v in result.model.state_dict().items())


def test_log_dir_holds_the_checkpoints_and_a_resumed_history(blobs, small_model, tmp_path):
    log = tmp_path / "log"
    first = fit(small_model, blobs, strategy=Periodic(every=4), log_dir=log, checkpoint_every=2)
    assert files.steps_on_disk(log / "checkpoints") == [18, 16]  # rounds 2, 4 and the end
    shutil.rmtree(log / "checkpoints" / "ckpt-000000018")  # as if stopped before the end
    again = fit(small_model, blobs, strategy=Periodic(every=4), log_dir=log, checkpoint_every=2, resume=True)
    assert max_abs_diff(first.model, again.model) <= TOL
    lines = [json.loads(line) for line in (log / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [4, 8, 12, 16, 18]


@pytest.mark.parametrize("kwargs, words", [
    ({"checkpoint_every": 0, "checkpoint_dir": "x"}, ["checkpoint_every=0", "'90s'"]),
    ({"checkpoint_every": "5 days", "checkpoint_dir": "x"}, ["checkpoint_every='5 days'", "'10min'"]),
    ({"checkpoint_every": 2}, ["checkpoint_every=2 needs checkpoint_dir"]),
    ({"keep_checkpoints": 0, "checkpoint_dir": "x"}, ["keep_checkpoints=0", "integer >= 1"]),
    ({"nan": "ignore"}, ["nan='ignore'", "'stop'", "'skip'", "'rollback'"]),
    ({"resume": True}, ["resume=True needs checkpoint_dir"]),
    ({"resume": "yes"}, ["resume='yes'"]),
])
def test_bad_reliability_settings_are_refused(blobs, small_model, kwargs, words):
    with pytest.raises(ConfigError) as info:
        fit(small_model, blobs, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_resume_refuses_a_checkpoint_of_another_run_and_a_fresh_run_refuses_a_used_directory(blobs, small_model,
                                                                                            tmp_path):
    fit(small_model, blobs, strategy=Periodic(every=4), checkpoint_dir=tmp_path)
    with pytest.raises(ConfigError, match="already holds checkpoints.*resume=True"):
        fit(small_model, blobs, strategy=Periodic(every=4), checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="lr=0.1 there, 0.2 now"):
        fit(small_model, blobs, strategy=Periodic(every=4), checkpoint_dir=tmp_path, resume=True, lr=0.2)
    with pytest.raises(CheckpointError, match="other training data"):
        fit(small_model, (blobs[0] + 1, blobs[1]), strategy=Periodic(every=4), checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="different model"):
        fit(unison.models.mlp(8, [12], 3), blobs, strategy=Periodic(every=4), checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="2 replicas; this run has 3"):
        fit(small_model, blobs, strategy=Periodic(every=4), checkpoint_dir=tmp_path, resume=True, workers=3)
    more = fit(small_model, blobs, strategy=Periodic(every=4), checkpoint_dir=tmp_path, resume=True, epochs=4)
    assert more.history[-1]["step"] == 24  # more epochs may be asked for on resume


def test_resume_with_no_checkpoint_yet_starts_from_the_beginning(blobs, small_model, tmp_path):
    with pytest.warns(files.CheckpointWarning, match="starting from the beginning"):
        resumed = fit(small_model, blobs, checkpoint_dir=tmp_path / "empty", resume=True)
    assert max_abs_diff(resumed.model, fit(small_model, blobs).model) == 0


@dataclass(frozen=True)
class CountsMerges(Periodic):
    """A strategy with state of its own, as DiLoCo's outer momentum: a count of its merges."""

    def merge_replicas(self, replica, comm):
        count = replica.strategy_state.setdefault("merges", torch.zeros(()))
        count += 1
        return super().merge_replicas(replica, comm)


def test_a_strategys_own_state_is_checkpointed_and_restored(blobs, small_model, tmp_path):
    fit(small_model, blobs, strategy=CountsMerges(every=4), checkpoint_dir=tmp_path / "all", keep_checkpoints=9)
    assert [float(files.load(tmp_path / "all" / files.directory_name(step)).replicas[1]["strategy/merges"])
            for step in (4, 8, 18)] == [1.0, 2.0, 5.0]
    shutil.rmtree(tmp_path / "all" / "ckpt-000000018")
    fit(small_model, blobs, strategy=CountsMerges(every=4), checkpoint_dir=tmp_path / "all", resume=True)
    final = files.load(tmp_path / "all" / "ckpt-000000018")
    assert float(final.replicas[0]["strategy/merges"]) == 5.0  # 4 before the resume, 1 after
