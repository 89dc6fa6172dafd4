"""Bad input raises a unison.errors exception naming the field and what is accepted, before
any worker starts (the processes backend is used: nothing may be spawned)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import unison
from unison.errors import ConfigError, DataError


@pytest.fixture
def no_spawn(monkeypatch):
    """Fail the test if a worker process is started."""
    import unison.launch.processes as processes

    def refuse(*args, **kwargs):
        raise AssertionError("a worker was started for bad input")
    monkeypatch.setattr(processes, "_supervise", refuse)
    monkeypatch.setattr(processes.torch_dist, "host_store", refuse)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"workers": 0}, ConfigError, ["workers=0", "integer >= 1"]),
    ({"workers": 97}, ConfigError, ["workers=97", "96 training samples"]),
    ({"workers": 2.5}, ConfigError, ["workers=2.5", "integer"]),
    ({"batch_size": 0}, ConfigError, ["batch_size=0", "integer >= 1"]),
    ({"epochs": 0}, ConfigError, ["epochs=0", "integer >= 1"]),
    ({"lr": 0.0}, ConfigError, ["lr=0.0", "finite number in (0.0"]),
    ({"lr": -0.1}, ConfigError, ["lr=-0.1"]),
    ({"lr": math.nan}, ConfigError, ["lr=nan", "finite"]),
    ({"lr": math.inf}, ConfigError, ["lr=inf", "finite"]),
    ({"momentum": 1.5}, ConfigError, ["momentum=1.5"]),
    ({"strategy": "gossip"}, ConfigError, ["strategy='gossip'", "'single'", "'sync'", "'periodic'", "'oneshot'"]),
    ({"strategy": "periodic(every=0)"}, ConfigError, ["periodic.every=0", "'epoch'"]),
    ({"strategy": "periodic(evry=3)"}, ConfigError, ["'evry'", "every, warmup, optimizer_state"]),
    ({"strategy": "periodic(optimizer_state=drop)"}, ConfigError, ["optimizer_state='drop'", "'keep'", "'reset'", "'average'"]),
    ({"strategy": "diloco(every=0)"}, ConfigError, ["diloco.every=0", "'epoch'"]),
    ({"strategy": "diloco(outer_lr=0)"}, ConfigError, ["diloco.outer_lr=0", "> 0"]),
    ({"strategy": "diloco(outer_momentum=1)"}, ConfigError, ["diloco.outer_momentum=1", "[0, 1)"]),
    ({"strategy": "periodic(merge=trimmed_mean(0.5))"}, ConfigError, ["trimmed_mean.beta=0.5", "[0, 0.5)"]),
    ({"strategy": "periodic(merge=trimmed_mean(0.2))"}, ConfigError, ["trims nothing with 2 workers"]),
    ({"strategy": "periodic(merge=krum(f=1))", "workers": 4}, ConfigError, ["krum(f=1)", "workers >= 2f+3 = 5",
                                                                           "workers=4"]),
    ({"strategy": "oneshot(merge=greedy_soup)"}, ConfigError, ["greedy_soup", "validation data", "val="]),
    ({"strategy": "sync(merge=greedy_soup)"}, ConfigError, ["combines gradients", "periodic or oneshot"]),
    ({"strategy": "periodic(merge=vote)"}, ConfigError, ["merge='vote'", "'median'", "'greedy_soup'"]),
    ({"partition": "dirichlet(alpha=-1)"}, ConfigError, ["dirichlet.alpha=-1", "> 0"]),
    ({"penalty": "l2(-0.5)"}, ConfigError, ["l2.strength=-0.5", ">= 0"]),
    ({"backend": "mpi"}, ConfigError, ["backend='mpi'", "'threads'", "'processes'", "'torchrun'"]),
    ({"partition": "random"}, ConfigError, ["partition='random'", "'shard'", "'full'"]),
    ({"optimizer": "lbfgs"}, ConfigError, ["optimizer='lbfgs'", "'sgd'", "'adam'", "'adamw'"]),
    ({"optimizer": "adam", "momentum": 0.9}, ConfigError, ["momentum=0.9", "'sgd'"]),
    ({"loss": "hinge"}, ConfigError, ["loss='hinge'", "'cross_entropy'", "'mse'"]),
    ({"seed": -1}, ConfigError, ["seed=-1"]),
    ({"loss": "custom"}, ConfigError, ["loss='custom'", "callable", "'cross_entropy'"]),
    ({"optimizer": "custom"}, ConfigError, ["optimizer='custom'", "callable", "'sgd'"]),
    ({"strategy": "sync(merge=median)", "batch_size": 8,
      "partition": unison.partitions.Explicit([range(0, 40), range(40, 96)])},
     ConfigError, ["sync(merge=median)", "batch at every step", "partition='shard'"]),
    ({"strategy": "periodic(merge=trimmed_mean(0.4))"}, ConfigError, ["trims nothing with 2 workers",
                                                                     "at least 3 workers"]),
    ({"partition": "dirichlet(inf)"}, ConfigError, ["dirichlet.alpha=inf", "finite"]),
])
def test_bad_settings(blobs, small_model, no_spawn, kwargs, error, words):
    with pytest.raises(error) as info:
        unison.fit(small_model, blobs, backend=kwargs.pop("backend", "processes"), progress=False, **kwargs)
    for word in words:
        assert word in str(info.value)


def _x():
    return np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)


@pytest.mark.parametrize("data, words", [
    ((_x(), np.zeros(19, dtype=np.int64)), ["20 rows", "y has 19"]),
    ((np.where(np.arange(160).reshape(20, 8) == 41, np.nan, _x()), np.zeros(20, dtype=np.int64)),
     ["non-finite", "row 5"]),
    ((_x(), np.full(20, -1)), ["negative class label", "integers >= 0"]),
    ((_x(), np.array(["a"] * 20)), ["y.dtype", "numbers"]),
    ((_x(),), ["data=", "(X, y) pair"]),
    ("mnist", ["data='mnist'", "'digits'", "'xor'", "'moons'"]),
])
def test_bad_data(small_model, no_spawn, data, words):
    with pytest.raises(DataError) as info:
        unison.fit(small_model, data, progress=False)
    for word in words:
        assert word in str(info.value)


def test_float_labels_with_classification_loss_must_be_integers(small_model, no_spawn):
    with pytest.raises(DataError, match="not integers"):
        unison.fit(small_model, (_x(), np.linspace(0, 2, 20)), loss="cross_entropy", progress=False)


def test_model_output_must_fit_the_classes(blobs, no_spawn):
    with pytest.raises(ConfigError) as info:
        unison.fit(unison.models.mlp(8, [4], 2), blobs, progress=False)  # 3 classes, 2 logits
    assert "model output shape=(2,)" in str(info.value) and "3 classes" in str(info.value)


def test_model_that_cannot_take_the_input_is_refused(blobs, no_spawn):
    with pytest.raises(DataError, match="input shape"):
        unison.fit(unison.models.mlp(5, [4], 3), blobs, progress=False)


def test_regression_output_shape_is_checked(no_spawn):
    x = torch.randn(20, 4)
    with pytest.raises(ConfigError, match="regression targets"):
        unison.fit(unison.models.mlp(4, [4], 3), (x, torch.randn(20)), progress=False)


def test_custom_optimizer_that_returns_junk_is_refused(blobs, small_model, no_spawn):
    with pytest.raises(ConfigError, match="torch.optim.Optimizer"):
        unison.fit(small_model, blobs, optimizer=lambda params: "sgd", progress=False)


def test_model_must_be_a_module_or_factory(blobs, no_spawn):
    with pytest.raises(ConfigError, match="nn.Module"):
        unison.fit("mlp", blobs, progress=False)
    with pytest.raises(ConfigError, match="nn.Module"):
        unison.fit(lambda: 3, blobs, progress=False)


def test_explicit_partition_must_have_one_share_per_worker(blobs, small_model, no_spawn):
    with pytest.raises(ConfigError, match="one share per worker"):
        unison.fit(small_model, blobs, partition=unison.partitions.Explicit([[0, 1]]), workers=2)


class _NeedsSharedMemory(unison.strategies.Oneshot):
    needs = frozenset({"shared_memory"})


def test_a_strategy_need_the_backend_lacks_is_refused_naming_both(blobs, small_model, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ConfigError) as info:
        unison.fit(small_model, blobs, strategy=_NeedsSharedMemory(), backend="torchrun")
    assert "shared_memory" in str(info.value) and "'torchrun'" in str(info.value)


def test_regression_with_float_targets_trains(no_spawn):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    result = unison.fit(nn.Linear(3, 1), (x, y), val=0.25, strategy="sync", workers=2, backend="threads",
                        epochs=30, batch_size=8, lr=0.05, progress=False)
    assert "val_acc" not in result.final
    assert result.final["val_loss"] < 0.01 * float(y.var())


def test_a_batch_of_one_sample_for_batchnorm_is_refused_up_front(no_spawn):
    x, y = torch.randn(18, 4), torch.arange(18) % 2
    with pytest.raises(ConfigError) as info:  # shares of 9: batches of 8 and 1
        unison.fit(unison.models.mlp(4, [4], 2, batchnorm=True), (x, y), strategy="sync", workers=2,
                   batch_size=8, progress=False)
    assert "batch_size=8" in str(info.value) and "BatchNorm" in str(info.value)
