"""Each strategy on the threads backend equals its sequential definition (tests/reference.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import unison
from unison.partitions import Explicit
from unison.strategies import Oneshot, Periodic, Sync

from reference import large_batch_sgd, local_sgd, max_abs_diff
from toy_models import CountsThreads

TOL = 1e-5


def fit(model, data, **kwargs):
    kwargs = {"backend": "threads", "epochs": 2, "batch_size": 8, "lr": 0.1, "progress": False,
              "val": None} | kwargs
    return unison.fit(model, data, **kwargs)


@pytest.mark.parametrize("workers", [2, 4])
def test_sync_equals_large_batch_sgd(blobs, small_model, workers):
    x, y = blobs
    result = fit(small_model, blobs, strategy="sync", workers=workers, momentum=0.9, weight_decay=1e-3)
    expected = large_batch_sgd(small_model, x, y, world_size=workers, batch_size=8, epochs=2, lr=0.1,
                               momentum=0.9, weight_decay=1e-3)
    assert max_abs_diff(result.model, expected) <= TOL
    assert max_abs_diff(result.model, small_model) > 1e-2  # it did train


def test_single_is_one_worker_plain_sgd(blobs, small_model):
    x, y = blobs
    result = fit(small_model, blobs, strategy="single", workers=4, momentum=0.5)
    assert result.workers == 1
    expected = large_batch_sgd(small_model, x, y, world_size=1, batch_size=8, epochs=2, lr=0.1, momentum=0.5)
    assert max_abs_diff(result.model, expected) <= TOL


def test_periodic_every_step_equals_sync(blobs, small_model):
    periodic = fit(small_model, blobs, strategy=Periodic(every=1), workers=2)
    sync = fit(small_model, blobs, strategy="sync", workers=2)
    assert max_abs_diff(periodic.model, sync.model) <= TOL


@pytest.mark.parametrize("every, warmup, state, momentum", [
    (3, 0, "keep", 0.0),
    (4, 0, "keep", 0.9),
    (4, 0, "reset", 0.9),
    (5, 0, "average", 0.9),
    ("epoch", 0, "keep", 0.9),
    (4, 5, "keep", 0.9),          # post-local SGD: 5 synchronous steps first
    ("epoch", 20, "average", 0.9),  # warm-up longer than an epoch (12 steps)
])
def test_periodic_equals_sequential_simulation(blobs, small_model, every, warmup, state, momentum):
    x, y = blobs
    strategy = Periodic(every=every, warmup=warmup, optimizer_state=state)
    result = fit(small_model, blobs, strategy=strategy, workers=2, momentum=momentum, epochs=3)
    expected = local_sgd(small_model, x, y, world_size=2, batch_size=8, epochs=3, lr=0.1,
                         momentum=momentum, every=every, warmup=warmup, optimizer_state=state)
    assert max_abs_diff(result.model, expected[0]) <= TOL


def test_periodic_merges_every_h_steps_counted_across_epochs(blobs, small_model):
    # 96 samples, 2 workers, batch 8: 6 steps an epoch, so every=4 merges at 4, 8, 12, 16 ...
    result = fit(small_model, blobs, strategy=Periodic(every=4), workers=2, epochs=3)
    assert [r["step"] for r in result.history] == [4, 8, 12, 16, 18]  # 18: the closing merge


@pytest.mark.parametrize("partition", ["shard", "full"])
def test_oneshot_equals_independent_training_then_mean(blobs, small_model, partition):
    x, y = blobs
    result = fit(small_model, blobs, strategy=Oneshot(), workers=3, partition=partition, momentum=0.9)
    part = unison.partitions.parse(partition)
    divergences = []
    expected = local_sgd(small_model, x, y, world_size=3, batch_size=8, epochs=2, lr=0.1, momentum=0.9,
                         orders=lambda rank, epoch: part.indices(len(x), 3, rank, epoch, 0),
                         divergences=divergences)
    assert max_abs_diff(result.model, expected[0]) <= TOL
    assert len(result.history) == 1
    assert result.history[0]["divergence"] == pytest.approx(divergences[0], rel=1e-4)


def test_divergence_is_the_mean_distance_to_the_merge_at_every_round(blobs, small_model):
    x, y = blobs
    result = fit(small_model, blobs, strategy=Periodic(every=5), workers=4, momentum=0.9, epochs=3)
    divergences = []
    local_sgd(small_model, x, y, world_size=4, batch_size=8, epochs=3, lr=0.1, momentum=0.9, every=5,
              divergences=divergences)
    assert [r["divergence"] for r in result.history] == pytest.approx(divergences, rel=1e-4)


def test_uneven_shares_weight_the_merge_by_samples(blobs, small_model):
    x, y = blobs
    shares = [list(range(0, 60)), list(range(60, 80))]  # 60 and 20 samples
    part = Explicit(shares)
    result = fit(small_model, blobs, strategy=Periodic(every="epoch"), workers=2, partition=part)
    expected = local_sgd(small_model, x, y, world_size=2, batch_size=8, epochs=2, lr=0.1, every="epoch",
                         orders=lambda rank, epoch: part.indices(len(x), 2, rank, epoch, 0))
    assert max_abs_diff(result.model, expected[0]) <= TOL
    # and the plain (unweighted) mean would have been measurably different
    plain = local_sgd(small_model, x, y, world_size=2, batch_size=8, epochs=1, lr=0.1, every=None,
                      orders=lambda rank, epoch: part.indices(len(x), 2, rank, epoch, 0))
    assert result.history[0]["samples"] == 80
    assert max_abs_diff(plain[0], expected[0]) > 1e-3


def test_sync_with_uneven_shares_is_sgd_on_the_union(blobs, small_model):
    """A replica whose share ran out still takes the shared step; gradients weigh by batch size."""
    x, y = blobs
    part = Explicit([list(range(0, 24)), list(range(24, 32))])  # 3 batches vs 1
    _CheckedSync.seen = []
    result = fit(small_model, blobs, strategy=_CheckedSync(), workers=2, partition=part, epochs=1)
    assert _CheckedSync.seen == [0.0]  # the replica without batches kept in step
    ref = torch.optim.SGD((model := __import__("copy").deepcopy(small_model)).parameters(), lr=0.1)
    orders = [part.indices(len(x), 2, r, 0, 0) for r in range(2)]
    for i in range(3):
        idx = torch.cat([o[i * 8:(i + 1) * 8] for o in orders])
        ref.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        ref.step()
    assert max_abs_diff(result.model, model) <= TOL


class _ComparesReplicasAfterMerge:
    """Mixin: after each merge, gather every replica's parameters and buffers, record the
    largest difference between replicas (0.0 when they are identical)."""

    seen: list = []

    def merge_replicas(self, replica, comm):
        distance = super().merge_replicas(replica, comm)
        state = torch.cat([t.detach().reshape(-1) for t in replica.model.state_dict().values()
                           if t.is_floating_point()])
        states = comm.all_gather(state)
        if comm.rank == 0:
            type(self).seen.append(max(float((s - states[0]).abs().max()) for s in states))
        return distance


class _CheckedPeriodic(_ComparesReplicasAfterMerge, Periodic):
    seen: list = []


class _CheckedSync(_ComparesReplicasAfterMerge, Sync):
    seen: list = []


def test_batchnorm_statistics_are_averaged_and_replicas_identical_after_merge(blobs):
    x, y = blobs
    torch.manual_seed(0)
    model = unison.models.mlp(8, [16], 3, batchnorm=True)
    strategy = _CheckedPeriodic(every=5)
    _CheckedPeriodic.seen = []
    result = fit(model, blobs, strategy=strategy, workers=2, momentum=0.9)
    assert _CheckedPeriodic.seen and max(_CheckedPeriodic.seen) == 0.0
    expected = local_sgd(model, x, y, world_size=2, batch_size=8, epochs=2, lr=0.1, momentum=0.9, every=5)
    assert max_abs_diff(result.model, expected[0]) <= TOL
    running_mean = result.model[1].running_mean
    assert not torch.allclose(running_mean, torch.zeros_like(running_mean))  # the stats did move


def test_sync_averages_batchnorm_statistics_at_epoch_end(blobs):
    x, y = blobs
    torch.manual_seed(0)
    model = unison.models.mlp(8, [16], 3, batchnorm=True)
    _CheckedSync.seen = []
    result = fit(model, blobs, strategy=_CheckedSync(), workers=2)
    assert _CheckedSync.seen == [0.0, 0.0]
    # the reference: post-local SGD whose warm-up covers all training is sync, buffers averaged
    expected = local_sgd(model, x, y, world_size=2, batch_size=8, epochs=2, lr=0.1, every="epoch",
                         warmup=10_000)
    assert max_abs_diff(result.model, expected[0]) <= TOL


def test_history_records_follow_the_schema(blobs, small_model):
    x, y = blobs
    result = fit(small_model, (x[:80], y[:80]), val=(x[80:], y[80:]), strategy="periodic", workers=2)
    assert [r["epoch"] for r in result.history] == [1.0, 2.0]
    for record in result.history:
        assert {"epoch", "step", "wall_s", "samples", "train_loss", "val_loss", "val_acc",
                "divergence", "comm_bytes"} <= record.keys()
    assert [r["samples"] for r in result.history] == [80, 160]
    assert result.history[0]["wall_s"] <= result.history[1]["wall_s"]
    assert 0 < result.history[0]["comm_bytes"] < result.history[1]["comm_bytes"]
    first = result.history[0]
    assert first["divergence"] > 0
    # val metrics are those of the returned (merged) model
    with torch.no_grad():
        out = result.model(x[80:])
    assert first is not result.history[-1]
    assert result.history[-1]["val_acc"] == pytest.approx(float((out.argmax(1) == y[80:]).float().mean()))
    assert result.history[-1]["val_loss"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(out, y[80:])), rel=1e-5)


def test_validation_runs_the_merged_model_in_eval_mode(blobs):
    """BatchNorm must use its running statistics on validation data, and evaluating must not
    update them."""
    x, y = blobs
    torch.manual_seed(0)
    model = unison.models.mlp(8, [16], 3, batchnorm=True, dropout=0.3)
    result = fit(model, (x[:80], y[:80]), val=(x[80:], y[80:]), strategy="periodic", workers=2)
    returned = result.model.eval()
    with torch.no_grad():
        out = returned(x[80:])
    assert result.final["val_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(out, y[80:])),
                                                     rel=1e-5)


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_split_the_cores_instead_of_oversubscribing(blobs, workers):
    expected = max(1, unison.launch.cpu_cores() // workers)
    result = fit(CountsThreads(expected), blobs, strategy="periodic", workers=workers, epochs=1)
    assert result.history  # CountsThreads raises inside a worker if the thread count is wrong


def test_frozen_parameters_stay_exactly_as_they_were(blobs):
    torch.manual_seed(0)
    model = unison.models.mlp(8, [16], 3)
    model[0].requires_grad_(False)
    for strategy in ("single", "sync", Periodic(every=2, warmup=3, optimizer_state="average")):
        result = fit(model, blobs, strategy=strategy, workers=2, weight_decay=0.1, momentum=0.9)
        assert torch.equal(result.model[0].weight, model[0].weight), strategy
        assert not torch.equal(result.model[2].weight, model[2].weight), strategy


def test_fit_leaves_the_callers_model_and_rng_alone(blobs, small_model):
    before = {k: v.clone() for k, v in small_model.state_dict().items()}
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    fit(small_model, blobs, strategy="periodic", workers=2)
    assert torch.equal(torch.rand(3), expected_draw)
    assert all(torch.equal(before[k], v) for k, v in small_model.state_dict().items())


def test_factory_is_built_under_the_seed(blobs):
    factory = lambda: unison.models.mlp(8, [16], 3)  # noqa: E731
    a = fit(factory, blobs, strategy="single", epochs=1, seed=7)
    b = fit(factory, blobs, strategy="single", epochs=1, seed=7)
    assert max_abs_diff(a.model, b.model) == 0.0


def test_log_dir_gets_history_and_model_and_is_never_overwritten(blobs, small_model, tmp_path):
    from safetensors.torch import load_file

    log = tmp_path / "log"
    result = fit(small_model, blobs, strategy="periodic", workers=2, log_dir=log)
    assert unison.history.read_jsonl(log / "history.jsonl") == result.history
    saved = load_file(log / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in result.model.state_dict().items())
    before = (log / "history.jsonl").read_text()
    with pytest.raises(unison.ConfigError, match="already holds a run"):
        fit(small_model, blobs, strategy="periodic", workers=2, log_dir=log)
    assert (log / "history.jsonl").read_text() == before


def test_one_worker_periodic_still_resets_optimizer_state(blobs, small_model):
    x, y = blobs
    result = fit(small_model, blobs, strategy=Periodic(every=3, optimizer_state="reset"), workers=1,
                 momentum=0.9)
    expected = local_sgd(small_model, x, y, world_size=1, batch_size=8, epochs=2, lr=0.1, momentum=0.9,
                         every=3, optimizer_state="reset")
    assert max_abs_diff(result.model, expected[0]) <= TOL


def test_gradients_live_in_one_flat_buffer_and_each_step_starts_from_zero(blobs, small_model):
    from unison.engine.replica import Replica

    x, y = blobs
    model = copy.deepcopy(small_model)
    replica = Replica(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, torch.device("cpu"))
    for batch in (slice(0, 8), slice(8, 16)):
        replica.forward_backward(x[batch], y[batch])
        expected = torch.autograd.grad(F.cross_entropy(small_model(x[batch]), y[batch]), list(small_model.parameters()))
        assert torch.allclose(replica.flat_grad, torch.cat([g.reshape(-1) for g in expected]), atol=1e-6)
    start, end = replica.flat_grad.data_ptr(), replica.flat_grad.data_ptr() + replica.flat_grad.nbytes
    assert all(start <= p.grad.data_ptr() < end for p in model.parameters())  # views, not copies


def test_a_parameter_the_first_step_does_not_reach_is_skipped_as_torch_skips_it(blobs):
    class WithUnusedHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.unused = unison.models.mlp(8, [16], 3), torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    model = WithUnusedHead()
    # weight decay would shrink the unused head if it got a zero gradient instead of none
    for strategy, workers in (("single", 1), ("periodic", 2)):
        result = fit(model, blobs, strategy=strategy, workers=workers, weight_decay=0.1, momentum=0.9)
        # (exact for one worker; two replicas' merge of equal values may round in the last bit)
        assert torch.allclose(result.model.unused.weight, model.unused.weight, rtol=0, atol=1e-6), strategy
        assert not torch.equal(result.model.body[0].weight, model.body[0].weight), strategy


def test_round_records_are_summed_once_an_epoch_with_the_values_of_summing_every_round(blobs, small_model,
                                                                                        tmp_path, monkeypatch):
    from unison.comm.threads import ThreadComm

    calls = []
    original = ThreadComm.all_reduce_sum
    monkeypatch.setattr(ThreadComm, "all_reduce_sum", lambda self, t: calls.append(self.rank) or original(self, t))
    x, y = blobs
    kwargs = dict(strategy="periodic(every=2)", workers=2, epochs=3, momentum=0.9, val=(x[80:], y[80:]))
    batched = fit(small_model, (x[:80], y[:80]), **kwargs)
    merges = len(batched.history)  # 40 samples a worker, 5 steps an epoch: merges at steps 2, 4, 6, ...
    assert merges == 15 // 2 + 1  # ... and a last one at step 15
    assert calls.count(0) == merges + 3  # one mean all-reduce per merge, one sum per epoch
    calls.clear()
    # with checkpoints every round's record is summed at once (the checkpoint saves the history)
    each_round = fit(small_model, (x[:80], y[:80]), checkpoint_dir=tmp_path / "c", **kwargs)
    assert calls.count(0) == 2 * merges
    timing = {"wall_s", "startup_s", "samples_per_s", "comm_s", "bookkeeping", "collectives"}
    for a, b in zip(batched.history, each_round.history, strict=True):
        assert a["collectives"] == b["collectives"]  # the strategy's; the bookkeeping's differ, as counted above
        assert {k: v for k, v in a.items() if k not in timing} == pytest.approx(
            {k: v for k, v in b.items() if k not in timing}, rel=1e-12)


@pytest.mark.parametrize("workers, val_rows", [(3, 16), (4, 2)])
def test_each_worker_evaluates_a_slice_and_the_record_is_the_merged_models_metrics(blobs, workers, val_rows):
    x, y = blobs
    torch.manual_seed(0)
    model = unison.models.mlp(8, [16], 3, batchnorm=True)
    val = (x[-val_rows:], y[-val_rows:])  # 16 rows: slices of 6, 5, 5; 2 rows: two slices are empty
    result = fit(model, (x[:72], y[:72]), val=val, strategy="periodic", workers=workers, momentum=0.9)
    with torch.no_grad():
        out = result.model.eval()(val[0])
    assert result.final["val_acc"] == float((out.argmax(1) == val[1]).double().mean())
    assert result.final["val_loss"] == pytest.approx(float(F.cross_entropy(out, val[1])), rel=1e-6)
