"""backend="stacked": R replicas as one vmapped computation give the same merged model as R
threads (max |Δ| ≤ 1e-5), strategy by strategy; its communicator against the merge functions;
what it refuses, before anything starts."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unison
from unison import merges
from unison.comm.stacked import StackedComm
from unison.engine.job import OptimizerSettings
from unison.engine.stacked import StackedReplica
from unison.errors import ConfigError
from unison.partitions import Explicit
from unison.penalties import parse_constraint

from reference import max_abs_diff, sampler_order
from test_comm import run_ranks
from toy_models import CountsThreads

TOL = 1e-5


def fit(model, data, **kwargs):
    kwargs = {"epochs": 2, "batch_size": 8, "lr": 0.1, "progress": False, "val": None} | kwargs
    return unison.fit(model, data, **kwargs)


def same_as_threads(model, data, **kwargs):
    """Train on stacked and on threads; return both results after checking they agree."""
    stacked = fit(model, data, backend="stacked", **kwargs)
    threads = fit(model, data, backend="threads", **kwargs)
    assert max_abs_diff(stacked.model, threads.model) <= TOL
    assert max_abs_diff(stacked.model, model) > 1e-3  # it did train
    assert [r["step"] for r in stacked.history] == [r["step"] for r in threads.history]
    for a, b in zip(stacked.history, threads.history):
        assert a["samples"] == b["samples"] and a.get("val_acc") == b.get("val_acc")
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["divergence"] == pytest.approx(b["divergence"], rel=1e-4, abs=1e-6)
    return stacked, threads


@pytest.fixture
def batchnorm_model():
    torch.manual_seed(0)
    return unison.models.mlp(8, [16], 3, batchnorm=True)


@pytest.mark.parametrize("strategy, kwargs", [
    ("sync", {"workers": 4, "momentum": 0.9, "weight_decay": 1e-3}),
    ("periodic(every=3)", {"momentum": 0.9, "nesterov": True}),
    ("periodic(every=4, warmup=5)", {"momentum": 0.9, "epochs": 3}),        # post-local SGD
    ("periodic(every=epoch, warmup=8, optimizer_state=average)", {"momentum": 0.9, "epochs": 3}),
    ("periodic(every=2, optimizer_state=reset)", {"optimizer": "adam", "lr": 0.01}),
    ("periodic(every=3, optimizer_state=average)", {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.1}),
    ("oneshot", {"workers": 3, "partition": "full", "momentum": 0.9}),
    ("diloco(every=4)", {"epochs": 3}),
    ("periodic(every=2, merge=median)", {"workers": 4}),
    ("periodic(every=2, merge=krum(f=1))", {"workers": 5}),
    ("sync(merge=trimmed_mean(0.25))", {"workers": 4}),
    ("single", {"workers": 3}),
])
def test_stacked_equals_threads(blobs, small_model, strategy, kwargs):
    same_as_threads(small_model, blobs, strategy=strategy, **({"workers": 2} | kwargs))


def test_greedy_soup_on_stacked_equals_threads(blobs, small_model):
    x, y = blobs
    stacked, _ = same_as_threads(small_model, blobs, val=(x[::3] + 0.5, y[::3]), workers=4, lr=0.3,
                                 strategy="oneshot(merge=greedy_soup)")
    assert stacked.history[-1]["comm_bytes"] == 0  # rows of one tensor exchange nothing


@pytest.mark.parametrize("kwargs", [
    {"strategy": "sync", "constraint": "max_norm(0.5)", "lr": 0.3},
    {"strategy": "periodic(every=2)", "constraint": "unit_ball(2.0)", "workers": 3, "lr": 0.3},
    {"strategy": "periodic(every=2, merge=krum(f=1))", "constraint": "non_negative", "workers": 5},
    {"strategy": "periodic(every=2)", "penalty": "elastic(0.01, 0.05)", "schedule": "cosine(warmup=3)"},
    {"strategy": "sync", "penalty": "l2(0.05)", "schedule": "step(every=1, gamma=0.5)", "momentum": 0.9},
])
def test_penalties_constraints_and_schedules_on_stacked_equal_threads(blobs, small_model, kwargs):
    same_as_threads(small_model, blobs, **({"workers": 2} | kwargs))


def test_constraints_project_each_replica_on_its_own(small_model):
    """Rows of a stacked tensor are separate replicas: max_norm caps each replica's output
    units, unit_ball each replica's whole vector — never the stacked tensor as one."""
    replica = StackedReplica(small_model, 2, F.cross_entropy, torch.device("cpu"), OptimizerSettings(),
                             constraint=parse_constraint("unit_ball(1.0)"))
    with torch.no_grad():
        for p in replica.trainable:
            p[0].fill_(1.0)     # replica 0: far outside the ball
            p[1].fill_(0.001)   # replica 1: inside it
    inside = replica.state_vector()[1].clone()
    replica.project()
    norms = torch.linalg.vector_norm(replica.state_vector()[:, :replica.num_parameters], dim=1)
    assert norms[0] == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(replica.state_vector()[1], inside)  # the small replica was left alone

    replica = StackedReplica(small_model, 2, F.cross_entropy, torch.device("cpu"), OptimizerSettings(),
                             constraint=parse_constraint("max_norm(1.0)"))
    weight = replica.params["0.weight"]  # [2 replicas, 16 units, 8 inputs]
    with torch.no_grad():
        weight[0].fill_(1.0)    # every unit's norm is sqrt(8)
        weight[1].fill_(0.1)    # every unit's norm is 0.28
    replica.project()
    assert torch.allclose(weight[0].norm(dim=1), torch.ones(16))
    assert torch.allclose(weight[1], torch.full((16, 8), 0.1))


def test_batchnorm_statistics_are_stacked_and_merged_like_threads(blobs, batchnorm_model):
    stacked, _ = same_as_threads(batchnorm_model, blobs, strategy="periodic(every=5)", workers=2, momentum=0.9,
                                 val=(blobs[0][:16], blobs[1][:16]))
    running_mean = stacked.model[1].running_mean
    assert not torch.allclose(running_mean, torch.zeros_like(running_mean))  # the stats did move


def test_uneven_shares_skip_replicas_without_a_batch_as_threads_do(blobs, small_model, batchnorm_model):
    """Adam keeps a step count per replica, and BatchNorm statistics stay per replica, when some
    replicas' shares run out before others' (batches of 8, 8, 4 / 8, 6 / 8, 8, 8, 8, 8).

    Rounding differs between one batched matmul and separate ones, so two things that enlarge
    it are avoided: Adam with BatchNorm (the bias before a BatchNorm has a gradient that is zero
    but for rounding, which Adam scales up to steps of size lr) and BatchNorm batches of 2."""
    part = Explicit([list(range(0, 20)), list(range(20, 34)), list(range(34, 74))])
    same_as_threads(small_model, blobs, strategy="periodic(every=2)", workers=3, partition=part,
                    optimizer="adam", lr=0.01)
    for strategy in ("periodic(every=2)", "sync"):
        same_as_threads(batchnorm_model, blobs, strategy=strategy, workers=3, partition=part, momentum=0.9)


def test_a_custom_optimizer_gets_one_parameter_group_per_replica(blobs, small_model):
    """Each replica's parameters are one group: setting a group's lr gives that replica its own."""
    x, y = blobs
    same_as_threads(small_model, blobs, strategy="periodic(every=3)", workers=2,
                    optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.5))
    lrs = [0.05, 0.3]
    result = fit(small_model, blobs, backend="stacked", strategy="oneshot", workers=2,
                 optimizer=lambda groups: torch.optim.SGD([dict(g, lr=lr) for g, lr in zip(groups, lrs)], lr=0.1))
    replicas = []  # the definition: each replica trained alone with its lr, then the mean
    for rank, lr in enumerate(lrs):
        model = copy.deepcopy(small_model)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for epoch in range(2):
            order = sampler_order(len(x), 2, rank, epoch, 0)
            for i in range(0, len(order), 8):
                opt.zero_grad()
                F.cross_entropy(model(x[order[i:i + 8]]), y[order[i:i + 8]]).backward()
                opt.step()
        replicas.append(model)
    with torch.no_grad():
        for mean, *params in zip(replicas[0].parameters(), *[r.parameters() for r in replicas]):
            mean.copy_(torch.stack(params).mean(0))
    assert max_abs_diff(result.model, replicas[0]) <= TOL


def test_dropout_draws_differ_per_replica_and_repeat_run_to_run(blobs):
    torch.manual_seed(0)
    model = unison.models.mlp(8, [32], 3, dropout=0.5)
    first = fit(model, blobs, backend="stacked", strategy="oneshot", workers=2, partition="full")
    again = fit(model, blobs, backend="stacked", strategy="oneshot", workers=2, partition="full")
    assert max_abs_diff(first.model, again.model) == 0.0
    assert first.history[-1]["divergence"] > 0


def test_stacked_trains_with_every_core(blobs):
    result = fit(CountsThreads(unison.launch.cpu_cores()), blobs, backend="stacked", strategy="periodic",
                 workers=3, epochs=1)
    assert result.history  # CountsThreads raises in the forward pass if the thread count is wrong


# ---- the communicator ----

def test_stacked_comm_reduces_over_rows(blobs):
    g = torch.Generator().manual_seed(3)
    rows, weights = torch.randn(4, 50, generator=g), torch.tensor([1.0, 3.0, 0.0, 2.0])
    comm = StackedComm(4)
    assert (comm.rank, comm.world_size) == (0, 4)
    mean = comm.all_reduce_mean(rows.clone(), weights)
    assert torch.allclose(mean, merges.weighted_mean(list(rows), weights.tolist()).expand(4, 50), atol=1e-6)
    assert torch.equal(comm.all_reduce_sum(rows.clone())[2], rows.sum(0))
    assert all(torch.equal(a, b) for a, b in zip(comm.all_gather(rows), rows))
    assert torch.equal(comm.broadcast(rows.clone(), src=2), rows[2].expand(4, 50))
    assert comm.bytes_sent == 0


def test_hierarchical_stacked_comm_equals_a_flat_one():
    """2 workers × 2 rows: the same ranks, gathers and weighted means as 4 flat workers, with
    one all-reduce per mean across the workers."""
    g = torch.Generator().manual_seed(4)
    rows, weights = torch.randn(4, 30, generator=g), torch.tensor([5.0, 1.0, 2.0, 0.0])

    def body(outer):
        comm = StackedComm(2, outer)
        mine = slice(2 * outer.rank, 2 * outer.rank + 2)
        mean = comm.all_reduce_mean(rows[mine].clone(), weights[mine])
        sent = comm.bytes_sent
        return comm.rank, comm.world_size, mean, sent, comm.all_gather(rows[mine].clone()), \
            comm.broadcast(rows[mine].clone(), src=3)

    results, errors = run_ranks(2, body)
    assert errors == [None, None]
    expected = merges.weighted_mean(list(rows), weights.tolist())
    for outer_rank, (rank, world_size, mean, sent, gathered, broadcast) in enumerate(results):
        assert (rank, world_size) == (2 * outer_rank, 4)
        assert torch.allclose(mean, expected.expand(2, 30), atol=1e-6)
        assert sent == 2 * (2 - 1) * (30 + 1) * 4 // 2  # one all-reduce of 31 floats between 2 workers
        assert all(torch.equal(a, b) for a, b in zip(gathered, rows))
        assert torch.equal(broadcast, rows[3].expand(2, 30))


# ---- what stacked refuses ----

class CallsItem(nn.Module):
    """Reads a tensor into Python in its forward pass: vmap cannot batch that."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 3)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.linear(x))


class Gate(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum().item() > 0 else x


@pytest.fixture
def nothing_starts(monkeypatch):
    import unison.launch.stacked as stacked

    def refuse(*args, **kwargs):
        raise AssertionError("training started for bad input")
    monkeypatch.setattr(stacked.BACKEND, "launch", refuse)


def test_a_model_that_cannot_be_vmapped_is_refused_naming_the_operation(blobs, nothing_starts):
    with pytest.raises(ConfigError) as info:
        fit(CallsItem(), blobs, backend="stacked", strategy="periodic")
    message = str(info.value)
    for words in ("backend='stacked'", ".item()", "module 'gate' (Gate)", "'threads' or 'processes'"):
        assert words in message
    assert fit(CallsItem(), blobs, backend="threads", strategy="periodic", epochs=1).history


@pytest.mark.parametrize("kwargs, words", [
    ({"strategy": "hogwild"}, ["'hogwild'", "backend 'stacked'", "shared model", "'threads'"]),
    ({"device": "gpu"}, ["device='gpu'", "'cpu', 'cuda' or 'cuda:N'"]),
    ({"device": "cuda", "backend": "threads"}, ["device='cuda'", "backend='stacked'"]),
    ({"replicas_per_worker": 2}, ["replicas_per_worker=2", "'processes'", "'torchrun'"]),
    ({"replicas_per_worker": 0, "backend": "processes"}, ["replicas_per_worker=0", "integer >= 1"]),
    ({"replicas_per_worker": 2, "backend": "processes", "strategy": "hogwild"}, ["'hogwild'", "replicas_per_worker=1"]),
    ({"replicas_per_worker": 2, "backend": "processes", "strategy": "single"}, ["'single'", "one replica"]),
    ({"workers": 97}, ["workers=97", "96 training samples"]),
    ({"workers": 4, "strategy": "periodic(merge=krum(f=1))"}, ["workers >= 2f+3 = 5"]),
])
def test_bad_stacked_settings_are_refused_before_training(blobs, small_model, nothing_starts, kwargs, words):
    with pytest.raises(ConfigError) as info:
        fit(small_model, blobs, **({"backend": "stacked"} | kwargs))
    for word in words:
        assert word in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_cuda_device_is_refused(blobs, small_model, nothing_starts):
    with pytest.raises(ConfigError, match="torch.cuda.is_available"):
        fit(small_model, blobs, backend="stacked", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_stacked_on_cuda_equals_stacked_on_cpu(blobs, batchnorm_model):
    kwargs = dict(backend="stacked", strategy="periodic(every=3)", workers=4, momentum=0.9)
    on_gpu = fit(batchnorm_model, blobs, device="cuda", **kwargs)
    on_cpu = fit(batchnorm_model, blobs, **kwargs)
    assert max_abs_diff(on_gpu.model, on_cpu.model) <= 1e-4
