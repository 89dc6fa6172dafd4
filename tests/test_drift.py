"""fedprox, scaffold, fednova and diloco's adaptive outer steps, each against a sequential
simulation of its paper's algorithm written out here (replicas looped over in one process)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import unison
from unison import checkpoint as files
from unison import schedules
from unison.errors import ConfigError
from unison.partitions import Explicit

from reference import max_abs_diff, sampler_order

TOL = 1e-5
UNEVEN = Explicit([range(0, 48), range(48, 72), range(72, 96)])  # 6, 3 and 3 steps an epoch


def fit(model, data, **kwargs):
    kwargs = {"backend": "threads", "workers": 3, "epochs": 3, "batch_size": 8, "lr": 0.1, "progress": False,
              "val": None} | kwargs
    if kwargs.get("partition") is None:
        kwargs.pop("partition", None)
    return unison.fit(model, data, **kwargs)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def load(model, vector):
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(vector[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def simulate(model, x, y, *, every, merge, correct=None, partition=None, world=3, epochs=3, lr=0.1,
             momentum=0.0, batch_size=8, schedule=None, reset_optimizer=False):
    """Replicas trained one after another with SGD. ``correct(r, replica)`` may change its
    gradients before each local step; every ``every`` steps (and at the end) ``merge(flat
    states, local steps, samples)`` returns the next global state, loaded into all. With a
    ``schedule`` (a unison.schedules spec) each step's lr is lr × its factor, and ``merge`` also
    gets each replica's sum of the round's lrs. ``reset_optimizer``: momentum buffers start each
    round at zero."""
    replicas = [copy.deepcopy(model) for _ in range(world)]
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum) for m in replicas]
    steps, samples, lr_sums = [0] * world, [0] * world, [0.0] * world
    step = last = 0
    rule = schedules.parse(schedule)
    per_epoch = max(math.ceil(len(o) / batch_size) for o in
                    ([partition.indices(len(x), world, r, 0, 0) for r in range(world)] if partition else
                     [sampler_order(len(x), world, r, 0, 0) for r in range(world)]))

    def end_round():
        nonlocal steps, samples, lr_sums, last
        states = [flat(m) for m in replicas]
        merged = merge(states, steps, samples, lr_sums) if rule else merge(states, steps, samples)
        for m in replicas:
            load(m, merged)
        if reset_optimizer:
            for opt in opts:
                opt.state.clear()
        steps, samples, lr_sums, last = [0] * world, [0] * world, [0.0] * world, step

    for epoch in range(epochs):
        orders = [partition.indices(len(x), world, r, epoch, 0) if partition else
                  sampler_order(len(x), world, r, epoch, 0) for r in range(world)]
        for i in range(max(math.ceil(len(o) / batch_size) for o in orders)):
            step += 1
            for r, (m, opt, order) in enumerate(zip(replicas, opts, orders)):
                idx = order[i * batch_size:(i + 1) * batch_size]
                if not len(idx):
                    continue
                opt.zero_grad()
                F.cross_entropy(m(x[idx]), y[idx]).backward()
                if correct is not None:
                    correct(r, m)
                if rule:
                    opt.param_groups[0]["lr"] = lr * rule.factor(step - 1, per_epoch, per_epoch * epochs)
                    lr_sums[r] += opt.param_groups[0]["lr"]
                opt.step()
                steps[r] += 1
                samples[r] += len(idx)
            if step % every == 0:
                end_round()
    if last != step:
        end_round()
    return replicas[0]


def weighted_mean(states, weights):
    w = torch.tensor(weights, dtype=torch.float32)
    return (torch.stack(states) * w[:, None]).sum(0) / w.sum()


def add_to_grad(model, vector):
    offset = 0
    for p in model.parameters():
        p.grad += vector[offset:offset + p.numel()].view_as(p)
        offset += p.numel()


# ---- FedProx (Li et al. 2020): g + mu·(w − w_global), then the samples-weighted mean ----

def fedprox_reference(model, x, y, mu, every, partition=None):
    anchor = [flat(model)]

    def correct(r, m):
        add_to_grad(m, mu * (flat(m) - anchor[0]))

    def merge(states, steps, samples):
        anchor[0] = weighted_mean(states, samples)
        return anchor[0]
    return simulate(model, x, y, every=every, merge=merge, correct=correct, partition=partition)


def test_fedprox_equals_its_definition_and_mu_zero_is_periodic(blobs, small_model):
    x, y = blobs
    result = fit(small_model, blobs, strategy="fedprox(mu=0.5, every=2)", partition=UNEVEN)
    expected = fedprox_reference(small_model, x, y, 0.5, 2, UNEVEN)
    assert max_abs_diff(result.model, expected) <= TOL
    periodic = fit(small_model, blobs, strategy="periodic(every=2)", partition=UNEVEN)
    assert max_abs_diff(periodic.model, expected) > 1e-4  # the proximal term made a difference
    plain = fit(small_model, blobs, strategy="fedprox(mu=0, every=2)", partition=UNEVEN)
    assert max_abs_diff(plain.model, periodic.model) <= TOL


# ---- SCAFFOLD (Karimireddy et al. 2020), Algorithm 1, option II, zero-initialised ----

def full_gradient(model, x, y, order, batch_size=8):
    """The mean loss's gradient over ``order``, taken batch by batch."""
    total = 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        model.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        total = total + len(idx) * torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return total / len(order)


def scaffold_reference(model, x, y, every, global_lr=1.0, lr=0.1, partition=None, world=3, log=None,
                       init="zero", momentum=0.0, schedule=None):
    """With momentum ρ, K_i is replaced by (K − ρ(1 − ρ^K)/(1 − ρ))/(1 − ρ), as unison documents."""
    n = flat(model).numel()
    g = {"x": flat(model), "c": torch.zeros(n), "ci": [torch.zeros(n) for _ in range(world)]}
    if init == "gradient":  # each c_i its replica's full gradient at the start, c their mean
        orders = [partition.indices(len(x), world, r, 0, 0) if partition else sampler_order(len(x), world, r, 0, 0)
                  for r in range(world)]
        g["ci"] = [full_gradient(copy.deepcopy(model), x, y, order) for order in orders]
        g["c"] = torch.stack(g["ci"]).mean(0)

    def correct(r, m):
        add_to_grad(m, g["c"] - g["ci"][r])

    def merge(states, steps, samples, lr_sums=None):
        x0, c = g["x"], g["c"]
        # η_l: the mean of the round's lrs (the lr itself without a schedule)
        mean_lrs = [lr] * world if lr_sums is None else [s / k if k else lr for s, k in zip(lr_sums, steps)]
        if momentum:
            steps = [(k - momentum * (1 - momentum ** k) / (1 - momentum)) / (1 - momentum) for k in steps]
        new_ci = [ci - c + (x0 - yi) / (k * eta) if k else ci
                  for ci, yi, k, eta in zip(g["ci"], states, steps, mean_lrs)]
        dy = torch.stack([yi - x0 for yi in states]).mean(0)
        dc = torch.stack([a - b for a, b in zip(new_ci, g["ci"])]).mean(0)
        g["x"], g["c"], g["ci"] = x0 + global_lr * dy, c + dc, new_ci
        if log is not None:
            log.append((g["c"].clone(), [ci.clone() for ci in new_ci]))
        return g["x"]
    return simulate(model, x, y, every=every, merge=merge, correct=correct, partition=partition, lr=lr,
                    momentum=momentum, schedule=schedule)


def test_scaffold_under_a_schedule_uses_the_mean_of_the_rounds_lrs(blobs, small_model):
    """A decaying lr: η_l is the round's mean lr, not its last one (which would overstate c_i)."""
    x, y = blobs
    result = fit(small_model, blobs, strategy="scaffold(every=4)", partition=UNEVEN, schedule="cosine")
    expected = scaffold_reference(small_model, x, y, 4, partition=UNEVEN, schedule="cosine")
    assert max_abs_diff(result.model, expected) <= TOL


@pytest.mark.parametrize("global_lr, partition, init, momentum", [
    (1.0, None, "zero", 0.0), (0.5, UNEVEN, "zero", 0.0), (1.0, UNEVEN, "gradient", 0.0), (1.0, UNEVEN, "zero", 0.9)])
def test_scaffold_equals_its_definition(blobs, small_model, global_lr, partition, init, momentum):
    x, y = blobs
    result = fit(small_model, blobs, strategy=f"scaffold(every=2, global_lr={global_lr}, init={init})",
                 partition=partition, momentum=momentum)
    expected = scaffold_reference(small_model, x, y, 2, global_lr, partition=partition, init=init, momentum=momentum)
    assert max_abs_diff(result.model, expected) <= TOL
    periodic = fit(small_model, blobs, strategy="periodic(every=2)", partition=partition, momentum=momentum)
    assert max_abs_diff(periodic.model, expected) > 1e-4  # the control variates made a difference
    if init == "gradient":
        zero = fit(small_model, blobs, strategy="scaffold(every=2)", partition=partition, momentum=momentum)
        assert max_abs_diff(zero.model, expected) > 1e-4  # and so did their start


@pytest.mark.parametrize("init", ["zero", "gradient"])
def test_scaffold_control_variates_start_right_stay_finite_and_c_is_their_mean(blobs, small_model, tmp_path,
                                                                               init):
    """A wrong start for c (not the mean of the c_i) is a known source of NaNs elsewhere: c
    starts at zero with every c_i (or at the mean of their start gradients), and after each round c equals the mean of the c_i⁺ (full
    participation). Uneven shares leave some replicas idle in late rounds (K_i = 0)."""
    x, y = blobs
    log = []
    scaffold_reference(small_model, x, y, 4, partition=UNEVEN, log=log, init=init)
    fit(small_model, blobs, strategy=f"scaffold(every=4, init={init})", partition=UNEVEN, checkpoint_dir=tmp_path / "c",
        keep_checkpoints=100)
    steps = sorted(files.steps_on_disk(tmp_path / "c"))
    assert len(steps) == len(log)
    for step, (c, cis) in zip(steps, log):
        saved = files.load(tmp_path / "c" / files.directory_name(step)).replicas
        c_saved = [s["strategy/scaffold.c"] for s in saved]
        ci_saved = [s["strategy/scaffold.ci"] for s in saved]
        assert all(torch.isfinite(t).all() for t in c_saved + ci_saved)
        assert all(torch.equal(c_saved[0], other) for other in c_saved)  # one c on every replica
        assert torch.allclose(c_saved[0], torch.stack(ci_saved).mean(0), atol=1e-6)
        assert torch.allclose(c_saved[0], c, atol=TOL)
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(ci_saved, cis))


# ---- FedNova (Wang et al. 2020): normalised averaging ----

def fednova_reference(model, x, y, every, momentum=0.0, partition=None):
    g = {"x": flat(model)}

    def norm(tau):
        if not momentum:
            return float(tau)
        rho = momentum
        return (tau - rho * (1 - rho ** tau) / (1 - rho)) / (1 - rho)

    def merge(states, steps, samples):
        p = [s / sum(samples) for s in samples]
        a = [norm(k) for k in steps]
        tau_eff = sum(pi * ai for pi, ai in zip(p, a))
        d = sum(pi * (g["x"] - yi) / ai for pi, yi, ai in zip(p, states, a) if ai)
        g["x"] = g["x"] - tau_eff * d
        return g["x"]
    return simulate(model, x, y, every=every, merge=merge, partition=partition, momentum=momentum,
                    reset_optimizer=bool(momentum))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fednova_equals_its_definition_on_unequal_local_steps(blobs, small_model, momentum):
    x, y = blobs
    result = fit(small_model, blobs, strategy="fednova(every=4)", partition=UNEVEN, momentum=momentum)
    expected = fednova_reference(small_model, x, y, 4, momentum, UNEVEN)
    assert max_abs_diff(result.model, expected) <= TOL
    periodic = fit(small_model, blobs, strategy="periodic(every=4, optimizer_state=reset)", partition=UNEVEN,
                   momentum=momentum)
    assert max_abs_diff(periodic.model, expected) > 1e-4  # unequal steps: normalising matters


def test_fednova_with_momentum_and_equal_local_steps_equals_periodic_resetting_its_optimizer(blobs, small_model):
    nova = fit(small_model, blobs, strategy="fednova(every=3)", momentum=0.9)
    periodic = fit(small_model, blobs, strategy="periodic(every=3, optimizer_state=reset)", momentum=0.9)
    assert max_abs_diff(nova.model, periodic.model) <= TOL
    kept = fit(small_model, blobs, strategy="periodic(every=3)", momentum=0.9)
    assert max_abs_diff(nova.model, kept.model) > 1e-4


def test_fednova_with_equal_local_steps_and_plain_sgd_equals_periodic(blobs, small_model):
    nova = fit(small_model, blobs, strategy="fednova(every=3)")
    periodic = fit(small_model, blobs, strategy="periodic(every=3)")
    assert max_abs_diff(nova.model, periodic.model) <= TOL


# ---- FedOpt (Reddi et al. 2021): diloco's outer step as Adam, AdamW or Yogi ----

def outer_reference(model, x, y, every, outer, lr, partition=None):
    theta = torch.nn.Parameter(flat(model))
    if outer == "yogi":  # Algorithm 2, FedYogi, with v₋₁ = τ² and no bias correction
        m, v = torch.zeros_like(theta), torch.full_like(theta, 1e-3 ** 2)
    else:
        kind = torch.optim.Adam if outer == "adam" else torch.optim.AdamW
        opt = kind([theta], lr=lr, betas=(0.9, 0.99), eps=1e-3)

    def merge(states, steps, samples):
        grad = theta.detach() - weighted_mean(states, samples)
        with torch.no_grad():
            if outer == "yogi":
                m.mul_(0.9).add_(0.1 * grad)
                v.sub_(0.01 * grad ** 2 * torch.sign(v - grad ** 2))
                theta.sub_(lr * m / (v.sqrt() + 1e-3))
            else:
                theta.grad = grad
                opt.step()
        return theta.detach().clone()
    return simulate(model, x, y, every=every, merge=merge, partition=partition)


@pytest.mark.parametrize("outer", ["adam", "adamw", "yogi"])
def test_diloco_adaptive_outer_steps_equal_fedopt(blobs, small_model, outer):
    x, y = blobs
    result = fit(small_model, blobs, strategy=f"diloco(every=3, outer={outer}, outer_lr=0.05)")
    expected = outer_reference(small_model, x, y, 3, outer, 0.05)
    assert max_abs_diff(result.model, expected) <= TOL


def test_drift_strategies_refuse_bad_options_naming_the_field():
    for spec, words in [("fedprox(mu=-1)", "fedprox.mu"), ("fedprox(every=0)", "fedprox.every"),
                        ("scaffold(init='grad')", "scaffold.init"), ("scaffold(global_lr=0)", "scaffold.global_lr"),
                        ("fednova(every='round')", "fednova.every"), ("diloco(outer='lamb')", "diloco.outer")]:
        with pytest.raises(ConfigError, match=words.replace(".", r"\.")) as info:
            unison.strategies.parse(spec)
        if "outer" in spec:
            assert all(name in str(info.value) for name in ("'sgd'", "'adam'", "'adamw'", "'yogi'"))


def test_drift_strategies_round_trip_through_their_specs():
    from unison.strategies import DiLoCo, FedNova, FedProx, Scaffold
    for strategy in (FedProx(mu=0.1, every=4), Scaffold(every=2, global_lr=0.5, init="gradient"), FedNova(every=3),
                     DiLoCo(every=4, outer="yogi", outer_lr=0.01)):
        assert unison.strategies.parse(strategy.spec()) == strategy


@pytest.mark.multiprocess
def test_scaffold_and_fednova_on_processes_equal_threads(blobs, small_model):
    for strategy in ("scaffold(every=2, init=gradient)", "fednova(every=4)",
                     "diloco(every=3, outer=adam, outer_lr=0.05)"):
        threads = fit(small_model, blobs, strategy=strategy, partition=UNEVEN)
        processes = fit(small_model, blobs, strategy=strategy, partition=UNEVEN, backend="processes")
        assert max_abs_diff(threads.model, processes.model) <= TOL, strategy


@pytest.mark.parametrize("strategy", ["fedprox(0.5, every=2)", "scaffold(every=2, init=gradient)", "fednova(every=4)",
                                      "diloco(every=3, outer=yogi, outer_lr=0.05)"])
def test_drift_strategies_stacked_equal_threads(blobs, small_model, strategy):
    kwargs = {"strategy": strategy, "partition": UNEVEN, "momentum": 0.5}
    threads = fit(small_model, blobs, **kwargs)
    stacked = fit(small_model, blobs, backend="stacked", **kwargs)
    assert max_abs_diff(threads.model, stacked.model) <= TOL
