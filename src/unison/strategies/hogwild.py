"""hogwild: every worker updates one shared model, without locks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import SHARED_MEMORY, Strategy, check_every, ends_every


@dataclass(frozen=True)
class Hogwild(Strategy):
    """Workers train the same parameters, held once in this machine's (shared) memory, each
    with its own optimizer and its own data order, and write their updates without locks
    (Niu et al. 2011, "HOGWILD!: A Lock-Free Approach to Parallelizing Stochastic Gradient
    Descent"). Nothing is averaged: there is one model. A round ends every ``every`` steps
    (default: at epoch ends); there the workers wait for each other so that the model is
    evaluated while none is writing. Shorter rounds only measure the model more often.

    One machine only: on ``threads`` the replicas share the parameter tensors; on
    ``processes`` the parameters live in shared memory.
    """

    name = "hogwild"
    needs = frozenset({SHARED_MEMORY})
    every: int | str = "epoch"

    def __post_init__(self) -> None:
        check_every(self.name, self.every)

    def round_ends(self, step, epoch_end):
        return ends_every(self.every, step, epoch_end)

    def merge_replicas(self, replica, comm):
        comm.barrier()  # everyone has stopped writing: the model can be evaluated as it is
        return torch.zeros((), device=replica.device)
