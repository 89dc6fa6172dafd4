"""hogwild, diloco and robust merges inside strategies, each against its sequential definition."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import unison
from unison.errors import ConfigError
from unison.models import mlp
from unison.strategies import DiLoCo, Hogwild, Oneshot, Periodic, Sync

from reference import (_load_flat_state, local_sgd, max_abs_diff, median_reference,
                       multi_krum_reference, sampler_order, trimmed_mean_reference)

TOL = 1e-5


def fit(model, data, **kwargs):
    kwargs = {"backend": "threads", "epochs": 2, "batch_size": 8, "lr": 0.1, "progress": False,
              "val": None} | kwargs
    return unison.fit(model, data, **kwargs)


@pytest.mark.parametrize("merge, workers, reference", [
    ("median", 4, median_reference),
    ("trimmed_mean(0.25)", 4, lambda s: trimmed_mean_reference(s, 0.25)),
    ("krum(f=1)", 5, lambda s: multi_krum_reference(s, 1, 1)),
    ("multi_krum(f=1, m=3)", 5, lambda s: multi_krum_reference(s, 1, 3)),
])
def test_periodic_with_a_robust_merge_equals_its_definition(blobs, small_model, merge, workers, reference):
    x, y = blobs
    result = fit(small_model, blobs, strategy=f"periodic(every=2, merge={merge})", workers=workers)
    expected = local_sgd(small_model, x, y, world_size=workers, batch_size=8, epochs=2, lr=0.1, every=2,
                         combine=reference)
    assert max_abs_diff(result.model, expected[0]) <= TOL
    mean = local_sgd(small_model, x, y, world_size=workers, batch_size=8, epochs=2, lr=0.1, every=2)
    assert max_abs_diff(mean[0], expected[0]) > 1e-4  # the rule made a difference


@dataclass(frozen=True)
class NegatedOneshot(Oneshot):
    """Replica 3 multiplies its parameters by -3 before the merge: with it, the mean of all four
    is about zero, so the soup should leave it out."""

    def merge_replicas(self, replica, comm):
        if comm.rank == 3:
            with torch.no_grad():
                for p in replica.trainable:
                    p.mul_(-3)
        return super().merge_replicas(replica, comm)


def test_greedy_soup_equals_its_definition_and_leaves_a_bad_replica_out(blobs, small_model):
    x, y = blobs
    x_val, y_val = x[::3] + 0.5, y[::3]
    chosen = []

    def soup(states):  # Wortsman et al.: by accuracy, add if the mean's accuracy does not drop
        states = list(states)
        n = sum(p.numel() for p in small_model.parameters())
        states[3] = torch.cat([-3 * states[3][:n], states[3][n:]])  # as NegatedOneshot does
        probe = unison.models.mlp(8, [16], 3)

        def score(state):
            _load_flat_state(probe, state)
            with torch.no_grad():
                return float((probe(x_val).argmax(1) == y_val).float().mean())
        order = sorted(range(len(states)), key=lambda i: -score(states[i]))
        chosen.append(order[0])
        for i in order[1:]:
            if score(torch.stack([states[j] for j in chosen + [i]]).mean(0)) >= score(
                    torch.stack([states[j] for j in chosen]).mean(0)):
                chosen.append(i)
        return torch.stack([states[j] for j in chosen]).mean(0)

    result = fit(small_model, blobs, val=(x_val, y_val), strategy=NegatedOneshot(merge="greedy_soup"),
                 workers=4, lr=0.3)
    expected = local_sgd(small_model, x, y, world_size=4, batch_size=8, epochs=2, lr=0.3, combine=soup)
    assert max_abs_diff(result.model, expected[0]) <= TOL
    assert 3 not in chosen and len(chosen) >= 2  # a real choice: some kept, the bad one left out


def test_robust_merges_keep_idle_replicas_as_votes_on_uneven_shares(blobs, small_model):
    """A replica whose share ran out holds the last merged state, and still votes."""
    x, y = blobs
    part = unison.partitions.Explicit([range(0, 40), range(40, 56), range(56, 72), range(72, 80), range(80, 96)])
    result = fit(small_model, blobs, strategy="periodic(every=2, merge=krum(f=1))", workers=5, partition=part)
    expected = local_sgd(small_model, x, y, world_size=5, batch_size=8, epochs=2, lr=0.1, every=2,
                         combine=lambda s: multi_krum_reference(s, 1, 1),
                         orders=lambda rank, epoch: part.indices(96, 5, rank, epoch, 0))
    assert max_abs_diff(result.model, expected[0]) <= TOL


def test_sync_with_a_median_of_gradients_equals_its_definition(blobs, small_model):
    x, y = blobs
    result = fit(small_model, blobs, strategy="sync(merge=median)", workers=3, epochs=1)
    model = unison.models.mlp(8, [16], 3)
    model.load_state_dict(small_model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    orders = [sampler_order(len(x), 3, r, 0, 0) for r in range(3)]
    for i in range(len(orders[0]) // 8):
        grads = []
        for order in orders:
            idx = order[i * 8:(i + 1) * 8]
            model.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        median = median_reference(grads)
        offset = 0
        for p in model.parameters():
            p.grad = median[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        opt.step()
    assert max_abs_diff(result.model, model) <= TOL


@dataclass(frozen=True)
class PoisonedPeriodic(Periodic):
    """Replica 4 multiplies its parameters by 1000 before every merge: a faulty worker."""

    def merge_replicas(self, replica, comm):
        if comm.rank == 4:
            with torch.no_grad():
                for p in replica.trainable:
                    p.mul_(1000)
        return super().merge_replicas(replica, comm)


def test_robust_merges_recover_from_a_poisoned_replica_and_the_mean_does_not():
    # tanh, not relu: a relu network scaled by 1000 keeps its argmax (it is homogeneous),
    # so poisoning it would hardly show in accuracy.
    def model():
        return mlp(64, [32], 10, activation="tanh")

    def accuracy(strategy):
        return unison.fit(model, "digits", val=0.2, strategy=strategy, workers=5, backend="threads", epochs=10,
                          lr=0.2, progress=False).final["val_acc"]

    clean_mean = accuracy(Periodic())
    assert accuracy(PoisonedPeriodic()) < clean_mean - 0.10
    for merge in ("median", "trimmed_mean(0.2)", "krum(f=1)"):
        clean, poisoned = accuracy(Periodic(merge=merge)), accuracy(PoisonedPeriodic(merge=merge))
        assert abs(poisoned - clean) <= 0.01, merge
        assert clean > clean_mean - 0.03, merge


def test_diloco_with_plain_outer_sgd_equals_periodic(blobs, small_model):
    plain = fit(small_model, blobs, strategy="diloco(every=3, outer_lr=1, outer_momentum=0)", workers=3)
    periodic = fit(small_model, blobs, strategy="periodic(every=3)", workers=3)
    assert max_abs_diff(plain.model, periodic.model) <= TOL
    default = fit(small_model, blobs, strategy="diloco(every=3)", workers=3)
    assert max_abs_diff(default.model, periodic.model) > 1e-3  # the outer momentum matters


@pytest.mark.parametrize("nesterov", [True, False])
def test_diloco_equals_its_definition(blobs, small_model, nesterov):
    x, y = blobs
    result = fit(small_model, blobs, strategy=DiLoCo(every=4, outer_lr=0.7, outer_momentum=0.9, nesterov=nesterov),
                 workers=2, epochs=3)
    expected = local_sgd(small_model, x, y, world_size=2, batch_size=8, epochs=3, lr=0.1, every=4,
                         outer=(0.7, 0.9, nesterov))
    assert max_abs_diff(result.model, expected[0]) <= TOL
    assert [r["step"] for r in result.history] == [4, 8, 12, 16, 18]  # 6 steps per epoch, and a last merge


def test_hogwild_with_one_worker_is_plain_sgd(blobs, small_model):
    hog = fit(small_model, blobs, strategy="hogwild", workers=1)
    single = fit(small_model, blobs, strategy="single")
    assert max_abs_diff(hog.model, single.model) == 0.0


class Linear(torch.nn.Module):
    """loss = -sum(w · x): its gradient, -x, does not depend on w, so the final w is the start
    minus lr times the sum of every update, in whatever order the workers apply them."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return (x * self.w).sum(1, keepdim=True)


def _linear_loss(out, target):
    return -out.mean()


@pytest.mark.parametrize("backend", ["threads", pytest.param("processes", marks=pytest.mark.multiprocess)])
def test_hogwild_workers_update_one_shared_model(backend):
    x = torch.arange(64 * 4, dtype=torch.float32).reshape(64, 4) / 100
    y = torch.zeros(64, 1)
    result = unison.fit(Linear(), (x, y), val=None, strategy="hogwild", workers=2, backend=backend, epochs=2,
                        batch_size=8, lr=0.01, loss=_linear_loss, progress=False)
    # each epoch every sample is used once, by one worker: with every update applied,
    # w = lr · 2 epochs · sum(x) / batch. Lock-free writes may lose an update to a race (two
    # workers read w, each writes back its own sum: Niu et al.'s model), never add one, so w
    # never exceeds that; each worker's updates alone would give about half of it.
    every_update = 0.01 * 2 * x.sum(0) / 8
    w = result.model.w.detach()
    assert (w <= every_update + 1e-5).all() and (w >= 0.75 * every_update).all()
    assert result.final["samples"] == 128 and result.final["step"] == 8  # 4 steps per worker and epoch


@pytest.mark.parametrize("backend", ["threads", pytest.param("processes", marks=pytest.mark.multiprocess)])
def test_hogwild_on_digits_is_within_two_points_of_single(backend):
    def model():
        return mlp(64, [64], 10)
    common = {"val": 0.2, "epochs": 15, "lr": 0.05, "progress": False}
    single = unison.fit(model, "digits", strategy="single", backend="threads", **common)
    hog = unison.fit(model, "digits", strategy="hogwild", workers=2, backend=backend, **common)
    assert hog.final["val_acc"] >= single.final["val_acc"] - 0.02
    assert hog.final["val_acc"] > 0.9


def test_hogwild_is_refused_on_torchrun_with_the_reason_and_the_alternatives(blobs, small_model, monkeypatch):
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        unison.fit(small_model, blobs, strategy="hogwild", backend="torchrun", progress=False)
    message = str(info.value)
    for words in ("'hogwild'", "torchrun", "shared memory", "backend='processes'", "diloco"):
        assert words in message


@pytest.mark.multiprocess
def test_robust_merge_and_diloco_on_processes_equal_threads(blobs, small_model):
    for strategy in ("periodic(every=2, merge=median)", "diloco(every=3)", "oneshot(merge=greedy_soup)"):
        kwargs = {"strategy": strategy, "workers": 3, "val": 0.25}
        threads = fit(small_model, blobs, **kwargs)
        processes = fit(small_model, blobs, backend="processes", **kwargs)
        assert max_abs_diff(threads.model, processes.model) <= TOL, strategy
        assert [r.get("val_acc") for r in threads.history] == [r.get("val_acc") for r in processes.history]


def test_strategies_round_trip_through_their_specs():
    for strategy in (Periodic(every=4, merge="krum(2)"), DiLoCo(every=8, outer_lr=0.5), Hogwild(),
                     Oneshot(merge="greedy_soup"), Sync(merge="median")):
        assert unison.strategies.parse(strategy.spec()) == strategy
    assert Periodic(every=4, merge="krum(2)").spec() == "periodic(every=4, merge=krum(f=2))"


def test_hogwild_every_n_steps_only_measures_more_often(blobs, small_model):
    x, y = blobs
    data, val = (x[:80], y[:80]), (x[80:], y[80:])
    per_epoch = fit(small_model, data, val=val, strategy="hogwild", workers=1, epochs=3)
    every_4 = fit(small_model, data, val=val, strategy="hogwild(every=4)", workers=1, epochs=3)
    assert max_abs_diff(every_4.model, per_epoch.model) == 0.0  # rounds are barriers, not merges
    assert [r["step"] for r in per_epoch.history] == [10, 20, 30]  # 80 samples, batch 8
    assert [r["step"] for r in every_4.history] == [4, 8, 12, 16, 20, 24, 28, 30]  # and a last round
    assert every_4.history[-1]["val_acc"] == per_epoch.history[-1]["val_acc"]
    with pytest.raises(unison.ConfigError, match="hogwild.every"):
        fit(small_model, data, strategy="hogwild(every=0)", workers=1)
