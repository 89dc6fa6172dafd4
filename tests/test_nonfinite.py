"""Non-finite steps on threads: replicas agree, each nan= policy does what it says, nothing
hangs; a run that breaks mid-way says where, and its checkpoints stay intact."""

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unison
from unison import checkpoint as files
from unison.errors import NonFiniteError, WorkerError
from unison.strategies import Periodic

from reference import max_abs_diff
from toy_models import Misbehaves


def fit(model, data, **kwargs):
    kwargs = {"backend": "threads", "workers": 2, "epochs": 3, "batch_size": 8, "lr": 0.1,
              "progress": False} | kwargs
    return unison.fit(model, data, **kwargs)


def sync_reference(model, x, y, *, bad_step, policy, world_size=2, batch_size=8, epochs=3, lr=0.1,
                   momentum=0.9, seed=0):
    """Large-batch SGD (what sync is) where step ``bad_step`` is skipped, or rolled back to the
    state of the last epoch end (sync's merge) with momentum cleared and the learning rate halved."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    merged = copy.deepcopy(model.state_dict())
    step, n = 0, len(x)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        perm = perm[: (n // world_size) * world_size]
        for start in range(0, len(perm), world_size * batch_size):
            idx = perm[start:start + world_size * batch_size]
            step += 1
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            if step == bad_step:
                if policy == "rollback":
                    model.load_state_dict(merged)
                    opt.state.clear()
                    opt.param_groups[0]["lr"] *= 0.5
                continue
            opt.step()
        merged = copy.deepcopy(model.state_dict())
    return model


def start(model_class=Misbehaves, **kwargs):
    torch.manual_seed(0)
    return model_class(**kwargs)


@pytest.mark.parametrize("policy", ["skip", "rollback"])
def test_sync_skip_and_rollback_equal_their_definitions(blobs, policy):
    model = start(how="nan", rank=1, at=8)  # 6 steps an epoch: step 8 is in the second epoch
    result = fit(model, blobs, strategy="sync", momentum=0.9, nan=policy)
    expected = sync_reference(model, *blobs, bad_step=8, policy=policy)
    assert max_abs_diff(result.model, expected) <= 1e-5
    assert "discarded_steps" not in result.history[0]
    assert result.history[-1]["discarded_steps"] == 2  # a shared step: discarded on both replicas
    assert result.history[-1]["rollbacks"] == (policy == "rollback")
    # skip loses the bad step's batches; rollback also those since the merge (step 7)
    lost = 16 if policy == "skip" else 32
    assert result.history[1]["samples"] - result.history[0]["samples"] == 96 - lost


def test_stop_names_the_step_the_replica_and_the_last_checkpoint(blobs, tmp_path):
    started = time.monotonic()
    with pytest.raises(NonFiniteError) as info:
        fit(start(how="nan", rank=1, at=14), blobs, strategy=Periodic(every=4), checkpoint_dir=tmp_path)
    assert time.monotonic() - started < 10  # no hang: replica 0 learnt of it in the same step
    message = str(info.value)
    assert "step 14 is not finite (replica 1: the model's output is non-finite" in message
    assert info.value.step == 14 and info.value.replicas == (1,) and info.value.rank == 1
    # a local step stops its replica at once: replica 0, which writes, may not have reached 12 yet
    last = files.latest_valid_path(tmp_path)
    assert last.name in ("ckpt-000000008", "ckpt-000000012") and info.value.checkpoint == str(last)
    assert "nan='stop'" in message and f"last checkpoint: {last}" in message
    assert files.load(last).step in (8, 12)  # intact


@pytest.mark.parametrize("strategy, discarded", [("sync", 2), (Periodic(every=4), 1)])
def test_skip_discards_a_shared_step_everywhere_and_a_local_step_on_its_replica(blobs, strategy, discarded):
    skipped = fit(start(how="nan", rank=0, at=5), blobs, strategy=strategy, nan="skip")
    assert skipped.history[-1]["samples"] == 3 * 96 - 8 * discarded  # the discarded batches of step 5
    assert skipped.history[-1]["discarded_steps"] == discarded and skipped.history[-1]["rollbacks"] == 0
    assert all(torch.isfinite(p).all() for p in skipped.model.parameters())


def test_a_local_rollback_undoes_the_round_at_most_three_times_then_stops(blobs):
    # rounds end at steps 4, 8, 12, 16, 18; replica 1 is not finite in steps 5-16
    result = fit(start(how="nan", rank=1, at=5, times=12), blobs, strategy=Periodic(every=4), nan="rollback")
    assert [r["step"] for r in result.history] == [4, 18]  # the rounds ending at 8, 12, 16 were undone
    assert result.history[-1]["rollbacks"] == 3 and result.history[-1]["samples"] == 4 * 16 + 2 * 16
    with pytest.raises(NonFiniteError, match="step 17 is not finite .replica 1.; nan='rollback' gave up after 3"):
        fit(start(how="nan", rank=1, at=5, times=14), blobs, strategy=Periodic(every=4), nan="rollback")


def test_a_rollback_halves_every_replicas_rate_and_forgets_the_round(blobs, tmp_path):
    fit(start(how="nan", rank=1, at=6), blobs, strategy=Periodic(every=4), nan="rollback", momentum=0.9,
        checkpoint_dir=tmp_path, keep_checkpoints=10)
    assert files.steps_on_disk(tmp_path) == [18, 16, 12, 4]  # the round ending at 8 was undone
    after = files.load(tmp_path / "ckpt-000000012")
    for rank in (0, 1):  # the rate is the replicas' own, in their optimizer state: halved on both
        assert after.replica_meta[rank]["optimizer"]["param_groups"][0]["lr"] == 0.05
        assert after.replica_meta[rank]["nan"] == {"rollbacks": 1, "discarded": rank}
    assert after.state["history"][-1]["samples"] == 2 * 4 * 16  # rounds 1 and 3; round 2 undone


class LogFeatures(nn.Module):
    """A model whose first step is a transform: log of the features, NaN for negative ones."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 3)

    def forward(self, x):
        return self.linear(torch.log(x + 3.0))


def test_features_that_turn_non_finite_inside_the_model_are_named(blobs):
    with pytest.raises(NonFiniteError, match=r"step 1 is not finite \(replica 0: the model's output is non-finite"):
        fit(LogFeatures(), blobs, strategy="sync")


class WrongOptimizer(torch.optim.SGD):
    def step(self, closure=None):
        self.steps = getattr(self, "steps", 0) + 1
        if self.steps == 3:
            raise ValueError("optimizer broke")
        return super().step(closure)


def make_wrong_optimizer(params):
    return WrongOptimizer(params, lr=0.1)


def test_a_model_returning_the_wrong_shape_or_an_optimizer_raising_mid_run(blobs, tmp_path):
    with pytest.raises(WorkerError) as info:
        fit(start(how="shape", rank=1, at=9), blobs, strategy=Periodic(every=4), checkpoint_dir=tmp_path)
    message = str(info.value)
    assert "worker 1 failed at step 9 (model output of shape (8, 2), targets of shape (8,))" in message
    assert "last checkpoint: " + str(tmp_path / "ckpt-000000008") in message
    assert files.load_latest(tmp_path).step == 8  # intact
    with pytest.raises(WorkerError, match="failed at step 3: ValueError: optimizer broke"):
        fit(start(how="none"), blobs, optimizer=make_wrong_optimizer, strategy="periodic")


def test_a_replica_that_stops_calling_collectives_is_named_after_the_timeout(blobs):
    started = time.monotonic()
    with pytest.raises(WorkerError) as info:  # it sleeps 4 s in a step; the others wait 1 s
        fit(start(how="hang", rank=1, at=3, seconds=4.0), blobs, strategy="sync", timeout=1.0)
    assert time.monotonic() - started < 8
    assert info.value.rank == 1
    assert "timed out after 1 s: rank 1 did not arrive" in str(info.value)
