"""Plain sequential computations of what each strategy is defined to do.

They share nothing with unison's code: data orders come from torch's DistributedSampler, and
the merge is a stack-and-mean written out here. Parallel results must equal these.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler


def sampler_order(n: int, world_size: int, rank: int, epoch: int, seed: int) -> torch.Tensor:
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.int64)


def large_batch_sgd(model, x, y, *, world_size, batch_size, epochs, lr, momentum=0.0,
                    weight_decay=0.0, seed=0):
    """One model, SGD with batch world_size·batch_size over the epoch's permutation."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = len(x)
    per_replica = n // world_size
    big = world_size * batch_size
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        perm = perm[: per_replica * world_size]
        for start in range(0, len(perm), big):
            idx = perm[start:start + big]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


def _average(models, weights=None):
    weights = torch.ones(len(models)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    with torch.no_grad():
        states = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in models]
        for name, tensor in states[0].items():
            if not tensor.is_floating_point():
                continue
            stacked = torch.stack([s[name] for s in states])
            mean = (stacked * weights.reshape(-1, *[1] * tensor.dim())).sum(0) / weights.sum()
            for s in states:
                s[name].copy_(mean)


def _average_optimizer_state(models, optimizers):
    with torch.no_grad():
        for params in zip(*[list(m.parameters()) for m in models]):
            states = [opt.state[p] for opt, p in zip(optimizers, params)]
            for key, value in states[0].items():
                if isinstance(value, torch.Tensor) and value.shape == params[0].shape:
                    mean = torch.stack([s[key] for s in states]).mean(0)
                    for s in states:
                        s[key].copy_(mean)


def _flat_state(model):
    return torch.cat([t.detach().reshape(-1) for t in list(model.parameters()) + list(model.buffers())
                      if t.is_floating_point()])


def _load_flat_state(model, flat):
    offset = 0
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def local_sgd(model, x, y, *, world_size, batch_size, epochs, lr, momentum=0.0, seed=0,
              every=None, warmup=0, optimizer_state="keep", orders=None, divergences=None,
              combine=None, outer=None, project=None):
    """N replicas trained one after another, averaged every ``every`` steps (an int),
    at epoch ends (``"epoch"``) or only at the end (None); the first ``warmup`` steps average
    gradients instead. ``orders(rank, epoch)`` gives a replica's indices (default: sampler).
    Replicas are weighted by the samples they trained on since the last average. Before each
    average, the mean distance of the replicas' parameters to it is appended to ``divergences``.
    ``combine(list of flat states) -> flat state`` replaces the weighted mean (robust merges).
    ``outer=(lr, momentum, nesterov)``: DiLoCo, an outer SGD step from the previous global
    parameters on the pseudo-gradient (previous − merged). ``project(params)`` (in place)
    runs after every optimizer step and every merge; the outer parameters are the projected merge."""
    orders = orders or (lambda rank, epoch: sampler_order(len(x), world_size, rank, epoch, seed))
    replicas = [copy.deepcopy(model) for _ in range(world_size)]
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum) for m in replicas]
    samples = [0] * world_size
    step = last_merge = 0
    if outer is not None:
        global_params = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        outer_lr, outer_momentum, nesterov = outer
        outer_opt = torch.optim.SGD([global_params], lr=outer_lr, momentum=outer_momentum, nesterov=nesterov)

    def merge():
        nonlocal last_merge, samples
        if divergences is not None:
            flat = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in replicas]
            w = torch.tensor(samples, dtype=torch.float32)
            mean = (torch.stack(flat) * w[:, None]).sum(0) / w.sum()
            divergences.append(float(torch.stack([(f - mean).norm() for f in flat]).mean()))
        if combine is not None:
            merged = combine([_flat_state(m) for m in replicas])
            for m in replicas:
                _load_flat_state(m, merged)
        else:
            _average(replicas, samples)
        if outer is not None:
            n = sum(p.numel() for p in replicas[0].parameters())
            merged = _flat_state(replicas[0])
            global_params.grad = global_params.detach() - merged[:n]
            outer_opt.step()
            merged[:n] = global_params.detach()
            for m in replicas:
                _load_flat_state(m, merged)
        if project is not None:
            with torch.no_grad():
                for m in replicas:
                    project(list(m.parameters()))
                if outer is not None:
                    global_params.data.copy_(torch.cat([p.detach().reshape(-1) for p in replicas[0].parameters()]))
        if optimizer_state == "reset":
            for opt in opts:
                opt.state.clear()
        elif optimizer_state == "average":
            _average_optimizer_state(replicas, opts)
        samples = [0] * world_size
        last_merge = step

    for epoch in range(epochs):
        epoch_orders = [orders(r, epoch) for r in range(world_size)]
        steps = max(math.ceil(len(o) / batch_size) for o in epoch_orders)
        for i in range(steps):
            step += 1
            batches = [o[i * batch_size:(i + 1) * batch_size] for o in epoch_orders]
            for m, opt, idx in zip(replicas, opts, batches):
                opt.zero_grad()
                if len(idx):
                    F.cross_entropy(m(x[idx]), y[idx]).backward()
            if step <= warmup:  # synchronous phase: one averaged gradient for all
                sizes = torch.tensor([float(len(b)) for b in batches])
                with torch.no_grad():
                    for params in zip(*[list(m.parameters()) for m in replicas]):
                        grads = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
                        mean = (grads * sizes.reshape(-1, *[1] * params[0].dim())).sum(0) / sizes.sum()
                        for p in params:
                            p.grad = mean.clone()
                for opt in opts:
                    opt.step()
            else:
                for opt, idx in zip(opts, batches):
                    if len(idx):
                        opt.step()
            if project is not None:
                with torch.no_grad():
                    for m, idx in zip(replicas, batches):
                        if len(idx) or step <= warmup:
                            project(list(m.parameters()))
            for r, idx in enumerate(batches):
                samples[r] += len(idx)
            if every not in (None, "epoch") and step > warmup and (step - warmup) % every == 0:
                merge()
        if every == "epoch" and step > warmup:
            merge()
        elif step <= warmup:  # sync rounds average the (BatchNorm) buffers at epoch ends
            _average(replicas, samples)
            samples, last_merge = [0] * world_size, step
    if last_merge != step:
        merge()
    return replicas


def max_abs_diff(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


# ---- merge rules written out plainly (numpy/scipy), independent of unison.merges ----

def median_reference(states):
    return torch.quantile(torch.stack(states).double(), 0.5, dim=0).to(states[0].dtype)


def trimmed_mean_reference(states, beta):
    from scipy.stats import trim_mean
    return torch.as_tensor(trim_mean(torch.stack(states).double().numpy(), beta, axis=0)).to(states[0].dtype)


def multi_krum_reference(states, f, m):
    n = len(states)
    scores = []
    for i in range(n):
        d = sorted(float(((states[i].double() - states[j].double()) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(d[:n - f - 2]))
    chosen = sorted(range(n), key=lambda i: (scores[i], i))[:m]
    return torch.stack([states[i] for i in chosen]).mean(0)
