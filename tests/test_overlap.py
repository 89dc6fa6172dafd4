"""sync's all-reduce overlapped with the backward pass (strategies/buckets.py): the same result
and the same bytes as the exchange after the backward pass, and raw DDP's result."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import unison
from unison.comm.torch_dist import TorchDistComm
from unison.engine.replica import Replica
from unison.errors import ConfigError, WorkerError
from unison.models import mlp
from unison.partitions import Explicit
from unison.strategies import Sync, buckets

from ddp_oracle import ddp_train
from reference import max_abs_diff
from toy_models import Misbehaves, SometimesSkips, current_rank

TINY = 1e-06  # MiB (1 byte): a bucket per parameter, so that most of them start inside the backward pass
UNEVEN = Explicit([list(range(0, 30)), list(range(30, 50))])  # 8,8,8,6 vs 8,8,4 and then none


def fit(model, data, **kwargs):
    kwargs = {"backend": "threads", "workers": 2, "epochs": 2, "batch_size": 8, "lr": 0.1, "momentum": 0.9,
              "progress": False, "val": None} | kwargs
    return unison.fit(model, data, **kwargs)


def same_run(result, expected):
    assert max_abs_diff(result.model, expected.model) == 0
    assert [r["comm_bytes"] for r in result.history] == [r["comm_bytes"] for r in expected.history]
    assert [r["train_loss"] for r in result.history] == [r["train_loss"] for r in expected.history]


@pytest.fixture
def started(monkeypatch):
    """(bucket, inside a backward pass) for every bucket started."""
    seen = []
    original = buckets.GradientBuckets._start

    def spy(self, b, weight):
        seen.append((b, torch._C._current_graph_task_id() != -1))
        original(self, b, weight)

    monkeypatch.setattr(buckets.GradientBuckets, "_start", spy)
    return seen


@pytest.mark.parametrize("workers, partition", [(2, "shard"), (2, UNEVEN), (4, "shard")])
def test_overlapped_sync_equals_sync_after_the_backward_pass(blobs, small_model, started, workers, partition):
    kwargs = {"workers": workers, "partition": partition, "weight_decay": 1e-3}
    expected = fit(small_model, blobs, strategy="sync(bucket_mb=0)", **kwargs)
    assert started == []
    same_run(fit(small_model, blobs, strategy=f"sync(bucket_mb={TINY})", **kwargs), expected)
    inside = [b for b, during_backward in started if during_backward]
    assert inside and 3 not in inside  # the last bucket (first parameter + weight) waits for the guard's fold
    assert sorted(set(inside)) == [0, 1, 2]
    same_run(fit(small_model, blobs, strategy="sync", **kwargs), expected)  # default: 25 MiB, one bucket


@pytest.mark.parametrize("unused", [False, True])
def test_missing_gradients_start_after_the_backward_pass(blobs, started, unused):
    """A layer skipped at some steps (on each replica at other steps) or never used: its bucket,
    and every one after it, starts after the backward pass; the result is still the same."""
    torch.manual_seed(0)
    model = SometimesSkips(unused=unused)
    expected = fit(model, blobs, strategy="sync(bucket_mb=0)", partition=UNEVEN)
    same_run(fit(model, blobs, strategy=f"sync(bucket_mb={TINY})", partition=UNEVEN), expected)
    inside = [b for b, during_backward in started if during_backward]
    if unused:  # the unused layer's parameters come last, so they are in the first bucket: nothing inside
        assert started and not inside
    else:
        assert inside and max(b for b, _ in started) not in inside


class InfiniteLossOnce:
    """Cross-entropy, plus +inf on replica 1's 5th training step: a constant, so its gradient
    stays finite and only the guard's fold of the loss into the gradient can tell the others."""

    def __init__(self):
        self.calls = [0, 0]

    def __call__(self, output, target):
        loss = F.cross_entropy(output, target)
        if torch.is_grad_enabled():
            rank = current_rank()
            self.calls[rank] += 1
            if rank == 1 and self.calls[rank] == 5:
                return loss + float("inf")
        return loss


def test_a_non_finite_loss_reaches_every_replica_through_the_last_bucket(blobs, small_model):
    expected = fit(small_model, blobs, strategy="sync(bucket_mb=0)", nan="skip", loss=InfiniteLossOnce())
    result = fit(small_model, blobs, strategy=f"sync(bucket_mb={TINY})", nan="skip", loss=InfiniteLossOnce())
    assert result.history[-1]["discarded_steps"] == 2  # both replicas skipped the step
    assert max_abs_diff(result.model, expected.model) == 0
    assert result.history[-1]["samples"] == expected.history[-1]["samples"] == 2 * 96 - 16


class EmptyFirst(torch.nn.Module):
    """An MLP after a parameter with no elements: the guard's fold goes into the next one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.nothing, self.net = torch.nn.Parameter(torch.zeros(0)), mlp(8, [16], 3)

    def forward(self, x):
        return self.net(x) + self.nothing.sum()


def test_the_fold_travels_when_the_first_parameter_is_empty(blobs, started):
    expected = fit(EmptyFirst(), blobs, strategy="sync(bucket_mb=0)", nan="skip", loss=InfiniteLossOnce())
    result = fit(EmptyFirst(), blobs, strategy=f"sync(bucket_mb={TINY})", nan="skip", loss=InfiniteLossOnce())
    assert result.history[-1].get("discarded_steps") == expected.history[-1]["discarded_steps"] == 2
    assert max_abs_diff(result.model.net, expected.model.net) == 0
    assert any(during_backward for _, during_backward in started)


def test_lent_gradients_are_dropped_for_every_trainable_parameter(small_model):
    """Also those the optimizer leaves out: a view of the lent buffer left there would have the
    next pass add into the last mean (and the guard sum it)."""
    optimizer = torch.optim.SGD(list(small_model.parameters())[2:], lr=0.1)
    replica = Replica(small_model, optimizer, F.cross_entropy, torch.device("cpu"))
    replica.forward_backward(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))
    mean = torch.randn(replica.num_parameters + 1)
    replica.lend_grad_buffer(mean[:-1])
    assert all(p.grad.untyped_storage().data_ptr() == mean.untyped_storage().data_ptr() for p in replica.trainable)
    replica.zero_grad()
    assert all(p.grad is None for p in replica.trainable) and replica.flat_grad is None


@pytest.mark.timeout(30)
def test_a_failing_peer_is_blamed_while_the_others_wait_inside_the_backward_pass(blobs):
    """Replica 1's loss fails at step 4 while replica 0 waits in its first bucket's all-reduce,
    inside its backward pass: replica 1's failure is what the run reports, and nothing hangs."""
    torch.manual_seed(0)
    with pytest.raises(WorkerError) as error:
        fit(Misbehaves(how="shape", rank=1, at=4), blobs, strategy=f"sync(bucket_mb={TINY})")
    assert "worker 1 failed at step 4 (model output of shape (8, 2)" in str(error.value)


def test_stacked_replicas_exchange_after_the_backward_pass(blobs, small_model, started):
    expected = fit(small_model, blobs, strategy="sync(bucket_mb=0)", workers=4)
    result = fit(small_model, blobs, strategy=f"sync(bucket_mb={TINY})", workers=4, backend="stacked")
    assert started == []
    assert max_abs_diff(result.model, expected.model) <= 1e-6


def test_buckets_are_assigned_as_ddp_assigns_them():
    """DDP's own assignment (torch.distributed), given the parameters last first, with its
    first bucket of 1 MiB (or the cap, if smaller)."""
    sizes = [1024 * 2048, 2048, 2048 * 2048, 2048, 2048 * 2048, 2048, 100, 7, 2048 * 10, 10]
    tensors = [torch.zeros(s) for s in reversed(sizes)]
    for mb in (25, 4, 1, TINY):
        limits = [int(min(mb, 1) * (1 << 20)), int(mb * (1 << 20))]
        theirs, _ = dist._compute_bucket_assignment_by_size(tensors, limits, [False] * len(tensors))
        assert buckets.assign(sizes, 4, mb) == [[len(sizes) - 1 - j for j in bucket] for bucket in theirs], mb


@pytest.mark.parametrize("spec, words", [
    ("sync(bucket_mb=-1)", ["sync.bucket_mb=-1", "a number >= 0"]),
    ("sync(bucket_mb=big)", ["sync.bucket_mb='big'", "a number >= 0"]),
    ("sync(bucket_mb=true)", ["sync.bucket_mb=True", "a number >= 0"]),
    ("sync(compress=fp16, bucket_mb=10)", ["sync.bucket_mb=10", "compress=fp16", "merge=mean and compress=none"]),
    ("sync(merge=median, bucket_mb=1)", ["sync.bucket_mb=1", "merge=median", "leave bucket_mb out"]),
])
def test_bad_bucket_sizes_are_refused_naming_the_field(spec, words):
    with pytest.raises(ConfigError) as error:
        unison.strategies.parse(spec)
    assert all(word in str(error.value) for word in words), str(error.value)


def test_overlap_applies_where_the_exchange_is_the_mean():
    assert Sync().overlap_mb == 25 and Sync(bucket_mb=0).overlap_mb == 0
    assert Sync(compress="fp16").overlap_mb == 0 and Sync(merge="median").overlap_mb == 0
    assert Sync(compress="fp16", bucket_mb=0).spec() == "sync(compress=fp16, bucket_mb=0)"


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_overlapped_sync_on_processes_equals_sync_after_the_backward_pass_and_threads(blobs, small_model):
    """torch.distributed's background all-reduces (async_op): two gloo ranks sum exactly."""
    kwargs = {"backend": "processes", "partition": UNEVEN}
    expected = fit(small_model, blobs, strategy="sync(bucket_mb=0)", **kwargs)
    same_run(fit(small_model, blobs, strategy=f"sync(bucket_mb={TINY})", **kwargs), expected)
    threads = fit(small_model, blobs, strategy=f"sync(bucket_mb={TINY})", partition=UNEVEN)
    assert max_abs_diff(threads.model, expected.model) <= 1e-6


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_overlapped_sync_equals_raw_ddp(blobs, small_model, tmp_path):
    x, y = blobs
    result = fit(small_model, blobs, strategy=f"sync(bucket_mb={TINY})", backend="processes")
    expected = ddp_train(tmp_path, small_model, x, y, hook=None, momentum=0.9)
    assert max_abs_diff(result.model, expected) <= 1e-6
    assert max_abs_diff(result.model, small_model) > 1e-2


def _worker(rank, store, out):
    """One gloo rank: a replica watched by sync's buckets, three steps of uneven batches; saves
    each step's local gradient, batch size and combined gradient, and which buckets started
    inside the backward pass."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    comm = TorchDistComm(timeout=60)
    torch.manual_seed(0)
    model = mlp(8, [16], 3)
    replica = Replica(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, torch.device("cpu"),
                      rank=rank)
    inside, start = [], buckets.GradientBuckets._start
    buckets.GradientBuckets._start = lambda self, b, w: (inside.append((b, torch._C._current_graph_task_id() != -1)),
                                                         start(self, b, w))
    strategy = Sync(bucket_mb=TINY)
    strategy.begin(replica, comm)
    g = torch.Generator().manual_seed(rank)
    steps, lent = [], []
    buffer = buckets.watched(replica).buffer
    for step in range(1, 4):
        x, y = torch.randn(4 + 3 * rank, 8, generator=g), torch.randint(0, 3, (4 + 3 * rank,), generator=g)
        replica.forward_backward(x, y)
        local = replica.grad_vector()
        strategy.on_gradients(replica, comm, step, len(x))
        steps.append((local, len(x), replica.grad_vector()))
        lent.append(all(p.grad.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
                        for p in replica.trainable))
        replica.zero_grad()
        lent.append(all(p.grad is None for p in replica.trainable))
    torch.save({"inside": inside, "steps": steps, "lent": lent}, f"{out}.{rank}")
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # as the DDP oracle's workers leave (gloo's teardown can abort)


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_torch_distributed_buckets_start_in_the_backward_pass_and_give_the_weighted_mean(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"out.{r}") for r in range(2)]
    for (g0, w0, mean0), (g1, w1, mean1) in zip(*[r["steps"] for r in ranks]):
        assert torch.allclose(mean0, (w0 * g0 + w1 * g1) / (w0 + w1), atol=1e-7) and torch.equal(mean0, mean1)
    for r in ranks:  # 4 buckets a step, 0-2 inside; the mean is the buffer, dropped before the next pass
        assert r["inside"] == [(b, b < 3) for b in range(4)] * 3
        assert r["lent"] == [True] * 6
