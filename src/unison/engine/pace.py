"""Declared worker speeds (a simulation of uneven workers on one machine) and measured throughput.

``speeds=[1, 1, 0.5, 0.25]`` makes worker r take max(speeds)/speeds[r] times its measured
forward-backward time per step: after its gradients are computed it waits the difference,
before the step's exchange, so a peer that needs its gradients (sync) or its merge waits too.
Speeds are relative: the fastest worker runs at its real speed. The wait changes time only,
never the numbers trained, and it is recorded (``simulated_wait_s`` in the round records).

The same clock gives each worker's measured throughput (samples per second of compute,
waits included), which ``balance="speed"`` sizes the next epoch's shares by (unison.partitions.
balanced_shares; Chen et al. 2020, "Semi-Dynamic Load Balancing", LB-BSP).
"""

from __future__ import annotations

from time import perf_counter, sleep
from typing import Callable

import torch


class Pace:
    """One worker's clock: the time of each step's gradients, its declared slowdown, its rate."""

    def __init__(self, speeds: tuple[float, ...] | None, rank: int, device: torch.device):
        self.slowdown = 1.0 / speeds[rank] - 1.0 if speeds else 0.0  # speeds over the fastest (plan)
        self.rank, self.cuda = rank, device.type == "cuda"
        self.device = device
        self.round_wait_s = 0.0      # simulated waiting since the last round record
        self.epoch_s = 0.0           # compute + simulated wait this epoch (for the measured rate)
        self.epoch_samples = 0
        self._started = 0.0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._started = perf_counter()

    def stop(self, samples: int) -> None:
        """After a step's gradients: wait out the declared slowdown, and count the step."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        elapsed = perf_counter() - self._started
        wait = elapsed * self.slowdown if samples else 0.0
        if wait > 0:
            sleep(wait)
        self.round_wait_s += wait
        self.epoch_s += elapsed + wait
        self.epoch_samples += samples

    def take_round_wait(self) -> float:
        wait, self.round_wait_s = self.round_wait_s, 0.0
        return wait

    def take_epoch_rate(self) -> float:
        """Samples per second this epoch (0 when nothing was measured), and start a new epoch."""
        rate = self.epoch_samples / self.epoch_s if self.epoch_s > 0 else 0.0
        self.epoch_s, self.epoch_samples = 0.0, 0
        return rate


def paced(pace: Pace | None, gradients: Callable[[], tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, int]:
    """``gradients()`` (a step's loss and sample count) timed by ``pace``, its declared slowdown
    waited out after it and before the step's exchange; as it is without a pace."""
    if pace is None:
        return gradients()
    pace.start()
    loss, count = gradients()
    pace.stop(count)
    return loss, count
