"""sync with the all-reduce overlapped with the backward pass, against raw DDP (issue 14, item 4).

Three ways of the same data-parallel SGD, 2 processes on gloo (CPU), one ≥ 10 M-parameter
model: an MLP 1024-2048-2048-2048-10 (10.5 M parameters, 42 MB of float32 gradients) on a
generated data set (Gaussian features, labels from a random linear teacher), SGD lr 0.01
momentum 0.9, batch 64 per worker, no evaluation:

- ``ddp``: raw torch DistributedDataParallel (its defaults: 25 MB buckets, a 1 MB first one),
  the loop a careful user writes (tensor indexing, each rank its DistributedSampler share);
- ``ddp(gradient_as_bucket_view)``: the same with the gradients as views of DDP's buckets (no
  copy in or out of them), the option a user tuning DDP turns on;
- ``sync``: unison, buckets of 25 MiB all-reduced while the backward pass runs (the default);
- ``sync(bucket_mb=0)``: unison, one all-reduce after the backward pass (before issue 14).

Each figure is the time per step of the epochs after the first (start-up and warm-up excluded).
They run interleaved, in a rotated order, ``--repeat`` times; the table gives each one's best
and median, their ratios to DDP's, and the median of the ratios paired by round (each against
the DDP run of its own round). On a shared machine one run moves by several percent.

    .venv/bin/python bench/overlap.py [--quick] [--steps 100] [--epochs 3] [--repeat 5]

It measures and prints; it asserts nothing. Results go into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import unison
from overhead import steady_epoch_s
from workload import _free_port, machine, table

LR, MOMENTUM, BATCH, WORKERS = 0.01, 0.9, 64, 2
FULL = {"features": 1024, "hidden": (2048, 2048, 2048), "classes": 10}
QUICK = {"features": 32, "hidden": (64, 64), "classes": 10}
DDP_AS_VIEW = "ddp(gradient_as_bucket_view)"
METHODS = ("ddp", DDP_AS_VIEW, "sync", "sync(bucket_mb=0)")


def model(features: int, hidden: tuple[int, ...], classes: int) -> nn.Module:
    torch.manual_seed(0)
    layers, width = [], features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, classes))


def dataset(rows: int, features: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, features, generator=g)
    y = (x @ torch.randn(features, classes, generator=g)).argmax(1)
    return x, y


def _ddp_worker(rank, port, net, x, y, epochs, as_view, queue):
    """One rank of raw DDP; rank 0 puts the wall time at each epoch end."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DistributedSampler

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // WORKERS))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORKERS)
    ddp = DistributedDataParallel(net, gradient_as_bucket_view=as_view)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=MOMENTUM)
    sampler = DistributedSampler(range(len(x)), num_replicas=WORKERS, rank=rank, shuffle=True, seed=0,
                                 drop_last=True)
    walls = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        for start in range(0, len(order), BATCH):
            idx = order[start:start + BATCH]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(x[idx]), y[idx]).backward()
            opt.step()
        walls.append(time.time())
    dist.barrier()
    if rank == 0:
        queue.put(walls)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's teardown can abort the interpreter after the work is done


def ddp_epoch_s(net, x, y, epochs, as_view: bool = False) -> float:
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_ddp_worker, args=(_free_port(), net, x, y, epochs, as_view, queue), nprocs=WORKERS,
                       start_method="spawn")
    walls = queue.get()
    return (walls[-1] - walls[0]) / (len(walls) - 1)


def unison_epoch_s(strategy, net, x, y, epochs) -> float:
    result = unison.fit(net, (x, y), val=None, strategy=strategy, workers=WORKERS, backend="processes",
                        epochs=epochs, batch_size=BATCH, lr=LR, momentum=MOMENTUM, progress=False)
    return steady_epoch_s(result.history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny MLP, 2 epochs of 8 steps, once: a smoke run")
    parser.add_argument("--steps", type=int, default=100, help="steps per epoch per worker")
    parser.add_argument("--epochs", type=int, default=3, help="the first is excluded")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    shape, steps, epochs, repeat = (QUICK, 8, 2, 1) if args.quick else (FULL, args.steps, args.epochs, args.repeat)
    if epochs < 2:
        parser.error("--epochs must be at least 2 (the first is excluded)")
    net = model(**shape)
    x, y = dataset(steps * BATCH * WORKERS, shape["features"], shape["classes"])
    x.share_memory_(), y.share_memory_()
    parameters = sum(p.numel() for p in net.parameters())
    print(f"# overlap — MLP {'-'.join(map(str, [shape['features'], *shape['hidden'], shape['classes']]))} "
          f"({parameters:,} parameters), {WORKERS} processes on gloo, batch {BATCH}, {steps} steps "
          f"an epoch, {epochs} epochs (first excluded), {repeat} rounds interleaved\n# {machine()}\n", flush=True)
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    for round_ in range(repeat):
        turn = round_ % len(METHODS)
        for method in METHODS[turn:] + METHODS[:turn]:  # rotated, so no method always goes first
            if method.startswith("ddp"):
                s = ddp_epoch_s(net, x, y, epochs, as_view=method == DDP_AS_VIEW)
            else:
                s = unison_epoch_s(method, net, x, y, epochs)
            seconds[method].append(s)
            print(f"  round {round_ + 1}: {method:<18} {1000 * s / steps:8.2f} ms/step", flush=True)
    best_ddp, median_ddp = min(seconds["ddp"]), statistics.median(seconds["ddp"])
    rows = [{"method": m if m != "ddp" else "raw DDP",
             "best": 1000 * min(s) / steps, "median": 1000 * statistics.median(s) / steps,
             "best_ratio": min(s) / best_ddp, "median_ratio": statistics.median(s) / median_ddp,
             "paired": statistics.median(a / b for a, b in zip(s, seconds["ddp"]))}
            for m, s in seconds.items()]
    print()
    print(table(rows, [("method", "{}"), ("best", "{:.2f}"), ("median", "{:.2f}"), ("best_ratio", "{:.3f}×"),
                       ("median_ratio", "{:.3f}×"), ("paired", "{:.3f}×")]))
    print("\nbest, median: ms per step (per worker); ratios: time per epoch / raw DDP's (lower is better); "
          "paired: the median of each round's ratio to that round's DDP; issue 14's target: sync ≤ 1.0× raw DDP.")


if __name__ == "__main__":
    main()
