"""Models that misbehave on purpose; at module level so spawned workers can import them."""

import os
import signal

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
