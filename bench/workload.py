"""The benchmark workload of issue 6 and the plain PyTorch loops unison is measured against.

Data: scikit-learn's make_classification, 400,000 × 64 training rows plus 20,000 test rows,
10 classes, 40 informative features, 2 clusters per class, class_sep 1.5, random_state 0.
Model: MLP 64-256-256-10; SGD lr 0.01, momentum 0.9, batch 64. The baselines below are written
the way a careful PyTorch user would write them (tensor indexing, no DataLoader), so that a
ratio against them measures unison, not a slow baseline.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FEATURES, CLASSES, HIDDEN = 64, 10, (256, 256)
LR, MOMENTUM, BATCH = 0.01, 0.9, 64
CACHE = Path(__file__).parent / ".cache"


def dataset(train: int = 400_000, test: int = 20_000) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test), float32/int64, cached as .npz after the first call."""
    path = CACHE / f"classification-{train}-{test}.npz"
    if not path.exists():
        from sklearn.datasets import make_classification

        x, y = make_classification(n_samples=train + test, n_features=FEATURES, n_informative=40,
                                   n_classes=CLASSES, n_clusters_per_class=2, class_sep=1.5, random_state=0)
        CACHE.mkdir(exist_ok=True)
        np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64))
    arrays = np.load(path)
    x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    return x[:train], y[:train], x[train:], y[train:]


def model() -> nn.Module:
    layers, width = [], FEATURES
    for hidden in HIDDEN:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, CLASSES))


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net(x).argmax(1) == y).float().mean())


def plain_loop(x, y, x_test, y_test, *, threads: int, epochs: int, seed: int = 0,
               evals_per_epoch: int = 1) -> list[dict]:
    """One process, ``threads`` intra-op threads: the single-process baseline. A record
    ``evals_per_epoch`` times an epoch with the wall time since the call (start-up included)
    and the test accuracy."""
    started = time.time()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    steps = len(x) // BATCH
    marks = {round(steps * k / evals_per_epoch) for k in range(1, evals_per_epoch + 1)}
    records = []
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))
        for step in range(1, steps + 1):
            idx = order[(step - 1) * BATCH:step * BATCH]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
            if step in marks:
                records.append({"epoch": epoch + step / steps, "wall_s": time.time() - started,
                                "val_acc": accuracy(net, x_test, y_test)})
    return records


def time_to(records: list[dict], target: float) -> float | None:
    """Wall seconds at the first record whose accuracy reaches ``target``."""
    return next((r["wall_s"] for r in records if r.get("val_acc", 0.0) >= target), None)


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}, "
            f"python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table; ``columns`` are (key, format) pairs, missing values shown as '-'."""
    head = "| " + " | ".join(k for k, _ in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(fmt.format(r[k]) if r.get(k) is not None else "-" for k, fmt in columns) + " |"
            for r in rows]
    return "\n".join([head, rule] + body)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, data, epochs, started, average_every, queue):
    """One process of the hand-written multi-process baselines (see ``multiprocess_loop``)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    x, y, x_test, y_test = data
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = model()
    for p in net.parameters():  # the same start everywhere
        dist.broadcast(p.data, 0)
    trained = DistributedDataParallel(net) if average_every is None else net
    opt = torch.optim.SGD(trained.parameters(), lr=LR, momentum=MOMENTUM)
    params = list(net.parameters())

    def average():  # what a user writes by hand: one flat buffer, one all-reduce, a mean
        flat = torch.cat([p.data.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for p in params:
            p.data.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    records, step, share = [], 0, len(x) // world
    first_step = None
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))[:share * world][rank::world]
        for start in range(0, share - BATCH + 1, BATCH):
            if first_step is None:
                first_step = time.time() - started
            idx = order[start:start + BATCH]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(trained(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
            if isinstance(average_every, int) and step % average_every == 0:
                average()
        if average_every == "epoch":
            average()
        if rank == 0:
            record = {"epoch": epoch + 1, "wall_s": time.time() - started}
            if x_test is not None:
                record["val_acc"] = accuracy(net, x_test, y_test)
            records.append(record)
    dist.barrier()
    if rank == 0:
        queue.put({"records": records, "startup_s": first_step})
    dist.destroy_process_group()
    # gloo's threads can abort the interpreter's teardown (SIGABRT) after the work is done;
    # torch.multiprocessing would report that as a failure. Leave without it.
    sys.stdout.flush()
    os._exit(0)


def multiprocess_loop(x, y, x_test, y_test, *, workers: int, epochs: int,
                      average_every: int | str | None = None) -> dict:
    """Hand-written torch.distributed baselines on gloo, spawned like torchrun would: raw
    DistributedDataParallel (``average_every=None``), or local SGD averaging parameters every
    ``average_every`` steps or each ``"epoch"``. Returns rank 0's records and start-up;
    without test data (``x_test=None``) nothing is evaluated."""
    import torch.multiprocessing as mp

    started = time.time()
    for tensor in (x, y, x_test, y_test):
        if tensor is not None:
            tensor.share_memory_()
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_worker, args=(workers, _free_port(), (x, y, x_test, y_test), epochs, started,
                                      average_every, queue), nprocs=workers, start_method="spawn")
    return queue.get()
