"""Samples per second of stacked replicas against one plain replica.

Model: MLP 64-256-256-10, batch 64 per replica, SGD with momentum 0.9, torch limited to
``--threads`` intra-op threads (2 by default). Two tables:

1. unison's own training step (forward, loss, backward, optimizer step): one ``Replica`` against
   a ``StackedReplica`` of 1, 2, 4, 8 and 16 replicas. Best of ``--repeats`` timings taken
   round-robin, after a warm-up; on CUDA the device is synchronised before each clock reading.
2. whole ``unison.fit`` runs (periodic, merged each epoch), ``backend="stacked"`` against
   ``backend="threads"`` with as many workers; samples per second of training time (the run's
   wall time less its start-up). fit() sets the threads itself: stacked uses every core, threads
   gives each worker cores // workers (at least 1). CPU only.

It measures and prints; it asserts nothing about time. Record results in bench/RESULTS.md.

    .venv/bin/python bench/stacked.py [--quick] [--device cuda] [--threads 2] [--no-fit]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

import unison
from unison.engine.job import OptimizerSettings
from unison.engine.replica import Replica
from unison.engine.stacked import StackedReplica
from unison.models import mlp

FEATURES, CLASSES, BATCH = 64, 10, 64


def model() -> torch.nn.Module:
    return mlp(FEATURES, [256, 256], CLASSES)


def synthetic(samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(samples, FEATURES, generator=g), torch.randint(0, CLASSES, (samples,), generator=g)


class StepTimer:
    """Training steps of one Replica (``replicas=None``) or one StackedReplica, timed on demand."""

    def __init__(self, replicas: int | None, device: torch.device, steps: int):
        torch.manual_seed(0)
        self.device, self.steps = device, steps
        self.x, self.y = (t.to(device) for t in synthetic(8192))
        optimizer = OptimizerSettings(lr=0.01, momentum=0.9)
        if replicas is None:
            net = model().to(device)
            self.replica = Replica(net, optimizer.build(net.parameters()), F.cross_entropy, device)
        else:
            self.replica = StackedReplica(model(), replicas, F.cross_entropy, device, optimizer)
        self.count = replicas or 1
        self.batches = [[torch.randint(0, len(self.x), (BATCH,), device=device) for _ in range(self.count)]
                        for _ in range(steps)]
        self.train(min(10, steps))  # warm-up: allocations, vmap's first trace
        self.best = float("inf")

    def train(self, n: int) -> None:
        for batch in self.batches[:n]:
            _, samples = self.replica.gradients(self.x, self.y, batch)
            self.replica.step += 1
            self.replica.optimizer_step(1, 1, samples=samples)

    def time(self) -> None:
        _synchronize(self.device)
        started = time.perf_counter()
        self.train(self.steps)
        _synchronize(self.device)
        self.best = min(self.best, time.perf_counter() - started)

    @property
    def rate(self) -> float:
        """Samples per second in the best timing."""
        return self.steps * self.count * BATCH / self.best


def fit_rate(backend: str, workers: int, samples: int) -> float:
    """Samples per second of training time in a whole fit() run."""
    result = unison.fit(model, synthetic(samples), strategy="periodic(every=epoch)", workers=workers,
                        backend=backend, epochs=2, batch_size=BATCH, lr=0.01, momentum=0.9,
                        progress=False, val=None)
    return result.history[-1]["samples"] / (result.wall_s - result.startup_s)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (a smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timings per row; the best is kept")
    parser.add_argument("--no-fit", action="store_true", help="skip the whole-fit() table")
    args = parser.parse_args()
    device = torch.device(args.device)
    steps, repeats = (20, 2) if args.quick else (100, 5)
    repeats = args.repeats or repeats
    torch.set_num_threads(args.threads)

    print(f"# unison bench/stacked.py — {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", {args.threads} intra-op threads, MLP {FEATURES}-256-256-{CLASSES}, batch {BATCH} per replica")
    print()
    print("training step (forward, backward, SGD step), best of", repeats, "x", steps, "steps")
    print(f"| {'replicas':>16} | {'samples/s':>10} | {'vs plain':>8} | {'ms/step':>8} |")
    print(f"| {'-' * 16}:| {'-' * 10}:| {'-' * 8}:| {'-' * 8}:|")
    # Round-robin over the rows, best of the repeats: a burst of load on a shared machine then
    # slows one timing of every row instead of every timing of one row.
    timers = {replicas: StepTimer(replicas, device, steps) for replicas in (None, 1, 2, 4, 8, 16)}
    for _ in range(repeats):
        for timer in timers.values():
            timer.time()
    plain = timers.pop(None).rate
    print(f"| {'1 plain':>16} | {plain:>10,.0f} | {1.0:>7.2f}x | {1000 * BATCH / plain:>8.2f} |")
    for replicas, timer in timers.items():
        print(f"| {f'{replicas} stacked':>16} | {timer.rate:>10,.0f} | {timer.rate / plain:>7.2f}x | "
              f"{1000 * replicas * BATCH / timer.rate:>8.2f} |")
    if args.no_fit or device.type != "cpu":
        return
    # threads: each worker gets cores // workers intra-op threads (at least 1), as fit() sets them.
    samples = 4096 if args.quick else 16384
    print()
    print(f"whole fit(): periodic(every=epoch), 2 epochs of {samples} samples; training time only")
    print(f"| {'workers':>7} | {'stacked samples/s':>17} | {'threads samples/s':>17} | {'stacked/threads':>15} |")
    print(f"| {'-' * 7}:| {'-' * 17}:| {'-' * 17}:| {'-' * 15}:|")
    fit_rate("stacked", 2, 1024), fit_rate("threads", 2, 1024)  # warm-up, not shown
    for workers in ((1, 4) if args.quick else (1, 2, 4, 8, 16)):
        stacked = threads = 0.0
        for _ in range(1 if args.quick else 2):  # best of two, alternating
            stacked = max(stacked, fit_rate("stacked", workers, samples))
            threads = max(threads, fit_rate("threads", workers, samples))
        print(f"| {workers:>7} | {stacked:>17,.0f} | {threads:>17,.0f} | {stacked / threads:>14.2f}x |", flush=True)


if __name__ == "__main__":
    main()
