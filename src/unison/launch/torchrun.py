"""Backend "torchrun": this process is one rank of a group that torchrun started.

gloo on CPU, NCCL when CUDA is present (each rank on cuda:LOCAL_RANK). Every rank returns the
same Result: the merged model is identical everywhere after the last merge, and rank 0's
history (the one with validation metrics) is broadcast to the others.
"""

from __future__ import annotations

import os

import torch

from ..comm import torch_dist
from ..engine.job import Job, Outcome
from ..errors import ConfigError, expected
from ..strategies.base import POINT_TO_POINT, SHARED_MEMORY
from .base import Backend
from .worker import own_process


def world_size() -> int | None:
    """WORLD_SIZE when started by torchrun, else None."""
    env = torch_dist.torchrun_environment()
    return int(env["WORLD_SIZE"]) if env else None


class Torchrun(Backend):
    name = "torchrun"
    offers = frozenset({POINT_TO_POINT})
    lacks = {SHARED_MEMORY: "it needs one model held in one machine's shared memory, and torchrun's "
                            "workers may run on different machines",
             POINT_TO_POINT: "with CUDA present its ranks talk through NCCL, which has no receive from "
                             "any rank; run on CPU (gloo), e.g. CUDA_VISIBLE_DEVICES="}
    stacks_per_worker = True
    in_process = False

    def why_not(self, needs: frozenset[str]) -> str | None:
        """POINT_TO_POINT only on gloo: the group is NCCL whenever CUDA is present."""
        if POINT_TO_POINT in needs and torch.cuda.is_available():
            return super().why_not(needs) or f"{POINT_TO_POINT}: {self.lacks[POINT_TO_POINT]}"
        return super().why_not(needs)

    def workers(self, requested: int | None) -> int:
        size = world_size()
        if size is None:
            raise ConfigError("backend='torchrun' needs torchrun's environment (RANK, WORLD_SIZE, "
                              "MASTER_ADDR, MASTER_PORT); start with `torchrun --nproc-per-node N ...` "
                              "or use backend='processes' or 'threads'")
        if requested not in (None, size):
            raise ConfigError(expected("workers", requested, f"{size} (torchrun's WORLD_SIZE) or None"))
        return size

    def is_writer(self) -> bool:
        """False only in a torchrun-started process whose RANK is not 0."""
        env = torch_dist.torchrun_environment()
        return env is None or env["RANK"] == "0"

    def restarted(self) -> bool:
        """Whether torchrun's elastic agent has restarted this group (not the first attempt)."""
        if torch_dist.torchrun_environment() is None:
            return False
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0

    def launch(self, job: Job) -> Outcome:
        comm, device, owned = torch_dist.join_from_environment(job.timeout)
        local_workers = int(os.environ.get("LOCAL_WORLD_SIZE", job.workers))
        with torch.random.fork_rng(devices=[]):
            outcome = own_process(job, comm, local_workers, device)
        shared = comm.broadcast_object({"history": outcome.history, "startup_s": outcome.startup_s}, src=0)
        if owned:
            torch_dist.leave()
        return Outcome(state=outcome.state, history=shared["history"], startup_s=shared["startup_s"])


BACKEND = Torchrun()
