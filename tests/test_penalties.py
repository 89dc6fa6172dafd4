"""Penalties, constraints, learning-rate schedules and optimizers: hand-computed cases, and
training with them equals plain large-batch SGD written out with the same rule."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import unison
from unison import penalties, schedules
from unison.errors import ConfigError

from reference import local_sgd, max_abs_diff, median_reference, sampler_order

TOL = 1e-5
PARAMS = [torch.tensor([1.0, -2.0]), torch.tensor([[3.0]])]


@pytest.mark.parametrize("penalty, value", [
    (penalties.L2(0.5), 0.25 * (1 + 4 + 9)),
    (penalties.L1(0.1), 0.1 * (1 + 2 + 3)),
    (penalties.Elastic(l1=0.1, l2=0.5), 0.6 + 3.5),
])
def test_penalty_values_and_gradients_by_hand(penalty, value):
    params = [p.clone().requires_grad_() for p in PARAMS]
    total = penalty(params)
    assert total.item() == pytest.approx(value)
    total.backward()
    l1 = getattr(penalty, "strength", 0) if penalty.name == "l1" else getattr(penalty, "l1", 0)
    l2 = getattr(penalty, "strength", 0) if penalty.name == "l2" else getattr(penalty, "l2", 0)
    for p, original in zip(params, PARAMS):
        assert torch.allclose(p.grad, l1 * original.sign() + l2 * original)


def test_max_norm_rescales_each_output_unit_and_leaves_vectors_alone():
    weight, bias = torch.tensor([[3.0, 4.0], [0.3, 0.4]]), torch.tensor([10.0, -10.0])
    penalties.MaxNorm(c=1.0).project([weight, bias])
    assert torch.allclose(weight, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))  # row 0 had norm 5
    assert torch.equal(bias, torch.tensor([10.0, -10.0]))


def test_unit_ball_projects_all_parameters_as_one_vector():
    a, b = torch.tensor([3.0]), torch.tensor([[4.0]])
    penalties.UnitBall(radius=1.0).project([a, b])
    assert torch.allclose(a, torch.tensor([0.6])) and torch.allclose(b, torch.tensor([[0.8]]))
    inside = [torch.tensor([0.1, 0.2])]
    penalties.UnitBall(radius=1.0).project(inside)
    assert torch.equal(inside[0], torch.tensor([0.1, 0.2]))


def test_non_negative_clamps():
    p = torch.tensor([-1.0, 0.0, 2.0])
    penalties.NonNegative().project([p])
    assert torch.equal(p, torch.tensor([0.0, 0.0, 2.0]))


def _sgd_reference(model, x, y, *, world_size, batch_size, epochs, lr, momentum=0.0, nesterov=False,
                   penalty=None, project=None, lr_lambda=None):
    """Large-batch SGD over the sampler's order, with loss + penalty(params), a projection
    after every step and torch's own LambdaLR for the schedule."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda else None
    for epoch in range(epochs):
        orders = [sampler_order(len(x), world_size, r, epoch, 0) for r in range(world_size)]
        for i in range(len(orders[0]) // batch_size):
            idx = torch.cat([o[i * batch_size:(i + 1) * batch_size] for o in orders])
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if penalty is not None:
                loss = loss + penalty(list(model.parameters()))
            loss.backward()
            opt.step()
            if scheduler:
                scheduler.step()
            if project is not None:
                with torch.no_grad():
                    project(list(model.parameters()))
    return model


def fit(model, data, **kwargs):
    kwargs = {"backend": "threads", "strategy": "sync", "workers": 2, "epochs": 2, "batch_size": 8, "lr": 0.1,
              "progress": False, "val": None} | kwargs
    return unison.fit(model, data, **kwargs)


@pytest.mark.parametrize("spec, written_out", [
    ("l2(0.05)", lambda ps: 0.05 / 2 * sum((p ** 2).sum() for p in ps)),
    ("l1(0.01)", lambda ps: 0.01 * sum(p.abs().sum() for p in ps)),
    ("elastic(0.01, 0.05)", lambda ps: sum(0.01 * p.abs().sum() + 0.025 * (p ** 2).sum() for p in ps)),
])
def test_sync_with_a_penalty_is_sgd_on_loss_plus_penalty(blobs, small_model, spec, written_out):
    x, y = blobs
    result = fit(small_model, blobs, penalty=spec)
    expected = _sgd_reference(small_model, x, y, world_size=2, batch_size=8, epochs=2, lr=0.1, penalty=written_out)
    assert max_abs_diff(result.model, expected) <= TOL
    assert max_abs_diff(result.model, fit(small_model, blobs).model) > 1e-4


def test_l2_penalty_equals_weight_decay(blobs, small_model):
    assert max_abs_diff(fit(small_model, blobs, penalty="l2(0.05)").model,
                        fit(small_model, blobs, weight_decay=0.05).model) <= TOL


def test_sync_with_max_norm_projects_after_every_step(blobs, small_model):
    x, y = blobs

    def project(params):
        for p in params:
            if p.dim() >= 2:
                p.copy_(torch.renorm(p, 2, 0, 0.5))
    result = fit(small_model, blobs, constraint="max_norm(0.5)", lr=0.3)
    expected = _sgd_reference(small_model, x, y, world_size=2, batch_size=8, epochs=2, lr=0.3, project=project)
    assert max_abs_diff(result.model, expected) <= TOL
    for p in result.model.parameters():
        if p.dim() >= 2:
            assert float(p.detach().norm(dim=1).max()) <= 0.5 + 1e-5


def _max_norm(params, c=0.5):
    for p in params:
        if p.dim() >= 2:
            p.copy_(torch.renorm(p, 2, 0, c))


def _non_negative(params):
    for p in params:
        p.clamp_(min=0)


@pytest.mark.parametrize("strategy, merge, outer", [
    ("periodic(every=2, merge=median)", median_reference, None),
    ("diloco(every=2)", None, (0.7, 0.5, True)),
])
@pytest.mark.parametrize("constraint, project", [("max_norm(0.5)", _max_norm), ("non_negative", _non_negative)])
def test_constraints_are_projected_after_steps_and_merges(blobs, small_model, strategy, merge, outer,
                                                          constraint, project):
    """A median or an outer momentum step can leave the set even when every replica is inside
    it; the merged model, and diloco's global parameters, must be projected back."""
    x, y = blobs
    result = fit(small_model, blobs, strategy=strategy, workers=5, constraint=constraint, lr=0.3)
    expected = local_sgd(small_model, x, y, world_size=5, batch_size=8, epochs=2, lr=0.3, every=2,
                         combine=merge, outer=outer, project=project)
    assert max_abs_diff(result.model, expected[0]) <= TOL


def test_schedule_factors_by_hand():
    cosine = schedules.Cosine(warmup=2)
    assert [cosine.factor(k, 5, 10) for k in (0, 1)] == [0.5, 1.0]             # warm-up 1/2, 2/2
    assert cosine.factor(6, 5, 10) == pytest.approx(0.5)                       # half-way through 8 steps
    assert schedules.Step(every=2, gamma=0.5).factor(10, 5, 30) == 0.5         # epoch 2 begins at step 10
    assert schedules.Step(every=2, gamma=0.5).factor(9, 5, 30) == 1.0
    assert [schedules.Warmup(4).factor(k, 5, 10) for k in (0, 3, 7)] == [0.25, 1.0, 1.0]


@pytest.mark.parametrize("spec", ["cosine(warmup=3)", "step(every=1, gamma=0.5)", "warmup(5)"])
def test_sync_with_a_schedule_equals_torch_lambda_lr(blobs, small_model, spec):
    x, y = blobs
    schedule = schedules.parse(spec)
    steps_per_epoch = 96 // 2 // 8
    result = fit(small_model, blobs, schedule=spec, epochs=3, momentum=0.9, nesterov=True)
    expected = _sgd_reference(small_model, x, y, world_size=2, batch_size=8, epochs=3, lr=0.1, momentum=0.9,
                              nesterov=True, lr_lambda=lambda k: schedule.factor(k, steps_per_epoch, 3 * steps_per_epoch))
    assert max_abs_diff(result.model, expected) <= TOL
    last = result.history[-1]
    assert last["lr"] == pytest.approx(0.1 * schedule.factor(last["step"] - 1, steps_per_epoch, 18))


def test_schedules_follow_the_global_step_when_a_share_runs_out(blobs, small_model):
    """The lr is a function of the global step, which every replica counts, batch or not."""
    part = unison.partitions.Explicit([list(range(0, 40)), list(range(40, 56))])
    result = fit(small_model, blobs, strategy="periodic(every=2)", partition=part, schedule="cosine", epochs=2)
    assert [r["step"] for r in result.history] == [2, 4, 6, 8, 10]  # 5 steps per epoch for both replicas
    assert result.history[-1]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))


def test_an_optimizer_factory_is_used_as_given(blobs, small_model):
    custom = fit(small_model, blobs, optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.5))
    named = fit(small_model, blobs, momentum=0.5)
    assert max_abs_diff(custom.model, named.model) == 0.0


@pytest.mark.parametrize("kwargs, words", [
    ({"penalty": "l2(-0.1)"}, ["l2.strength=-0.1", ">= 0"]),
    ({"penalty": "elastic(l1=-1)"}, ["elastic.l1=-1"]),
    ({"penalty": "l3"}, ["penalty='l3'", "'l2'", "'elastic'"]),
    ({"constraint": "max_norm(0)"}, ["max_norm.c=0", "> 0"]),
    ({"constraint": "box"}, ["constraint='box'", "'unit_ball'"]),
    ({"schedule": "cosine(warmup=-1)"}, ["cosine.warmup=-1"]),
    ({"schedule": "step(gamma=2)"}, ["step.gamma=2", "(0, 1]"]),
    ({"schedule": "linear"}, ["schedule='linear'", "'cosine'", "'warmup'"]),
    ({"nesterov": True}, ["nesterov=True", "momentum > 0"]),
    ({"nesterov": True, "momentum": 0.9, "optimizer": "adam"}, ["momentum=0.9", "'sgd'"]),
])
def test_bad_options_are_refused_before_training(blobs, small_model, kwargs, words):
    with pytest.raises(ConfigError) as info:
        fit(small_model, blobs, **kwargs)
    for word in words:
        assert word in str(info.value)
