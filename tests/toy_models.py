"""Models that misbehave on purpose; at module level so spawned workers can import them."""

import os
import signal
import threading
import time

import torch
import torch.distributed as dist
from torch import nn


class CountsThreads(nn.Module):
    """A linear model that fails if its worker trains with other than ``expected`` intra-op threads."""

    def __init__(self, expected):
        super().__init__()
        self.linear = nn.Linear(8, 3)
        self.expected = expected

    def forward(self, x):
        if self.training and torch.get_num_threads() != self.expected:  # eval: fit()'s probe
            raise RuntimeError(f"{torch.get_num_threads()} intra-op threads, expected {self.expected}")
        return self.linear(x)


class OddError(Exception):
    """An exception whose __init__ breaks unpickling (as many custom exceptions do)."""

    def __init__(self, code, detail):
        super().__init__(f"{code}: {detail}")


class DiesOnRank1(nn.Module):
    """A linear model that, in the worker of rank 1, fails at its 4th forward pass."""

    def __init__(self, how: str):
        super().__init__()
        self.linear = nn.Linear(8, 3)
        self.how = how
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if dist.is_initialized() and dist.get_rank() == 1 and self.calls == 4:
            if self.how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.how == "exit":
                os._exit(3)
            if self.how == "odd":
                raise OddError(7, "bad batch")
            raise RuntimeError("boom in the forward pass")
        return self.linear(x)


def current_rank() -> int:
    """This worker's rank on any backend: the process group's, or the thread's name."""
    if dist.is_initialized():
        return dist.get_rank()
    name = threading.current_thread().name
    return int(name.rsplit("-", 1)[1]) if name.startswith("unison-worker-") else 0


class Misbehaves(nn.Module):
    """A linear model that, on replica ``rank``, misbehaves in its ``at``-th training forward pass:
    "nan" returns NaN outputs, "hang" sleeps ``seconds`` (stops calling collectives), "exit"
    ends the process (only while TORCHELASTIC_RESTART_COUNT is unset or 0: a torchrun restart
    then trains normally), "shape" returns one logit too few. ``times`` bad passes in a row."""

    def __init__(self, how: str, rank: int = 1, at: int = 4, times: int = 1, seconds: float = 0.0,
                 delay: float = 0.0):
        super().__init__()
        self.linear = nn.Linear(8, 3)
        self.how, self.rank, self.at, self.times, self.seconds, self.delay = how, rank, at, times, seconds, delay
        self.calls = 0

    def forward(self, x):
        out = self.linear(x)
        if not self.training:  # fit()'s probe and validation
            return out
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if current_rank() != self.rank or not self.at <= self.calls < self.at + self.times:
            return out
        if self.how == "nan":
            return out * float("nan")
        if self.how == "hang":
            time.sleep(self.seconds)
        if self.how == "exit" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os._exit(3)
        if self.how == "shape":
            return out[:, :2]
        return out


def blobs_data():
    """The ``blobs`` fixture's data (tests/conftest.py), for scripts that run outside pytest."""
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(3, 8, generator=g) * 2
    y = torch.arange(96) % 3
    x = centres[y] + torch.randn(96, 8, generator=g)
    return x, y


class SometimesSkips(nn.Module):
    """An MLP whose middle layer a training pass skips now and then (every 3rd pass, counted
    from a different start on each replica), and, with ``unused=True``, a layer no pass uses:
    gradients that are missing at a step, or always."""

    def __init__(self, unused: bool = False):
        super().__init__()
        self.first, self.middle, self.last = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.unused = nn.Linear(16, 16) if unused else None
        self.calls = 0

    def forward(self, x):
        h = torch.relu(self.first(x))
        if self.training:
            self.calls += 1
        if not self.training or (self.calls + current_rank()) % 3:
            h = torch.relu(self.middle(h))
        return self.last(h)
