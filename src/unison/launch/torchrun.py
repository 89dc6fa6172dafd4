"""Backend "torchrun": this process is one rank of a group that torchrun started.

gloo on CPU, NCCL when CUDA is present (each rank on cuda:LOCAL_RANK). Every rank returns the
same Result: the merged model is identical everywhere after the last merge, and rank 0's
history (the one with validation metrics) is broadcast to the others.
"""

from __future__ import annotations

import os

import torch

from ..comm import torch_dist
from ..replica import Job, Outcome, run
from . import stacked as stacked_backend
from . import threads_per_worker


def world_size() -> int | None:
    """WORLD_SIZE when started by torchrun, else None."""
    env = torch_dist.torchrun_environment()
    return int(env["WORLD_SIZE"]) if env else None


def is_rank0() -> bool:
    """False only in a torchrun-started process whose RANK is not 0: the one that writes files."""
    env = torch_dist.torchrun_environment()
    return env is None or env["RANK"] == "0"


def launch(job: Job, world_size: int) -> Outcome:
    local_workers = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    torch.set_num_threads(threads_per_worker(local_workers))
    comm, device, owned = torch_dist.join_from_environment(job.config.timeout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.config.seed + comm.rank)
        replicas = job.config.replicas_per_worker
        outcome = run(job, comm, device) if replicas == 1 else stacked_backend.run_stacked(job, comm, replicas, device)
    shared = comm.broadcast_object({"history": outcome.history, "startup_s": outcome.startup_s}, src=0)
    if owned:
        torch_dist.leave()
    return Outcome(state=outcome.state, history=shared["history"], startup_s=shared["startup_s"])


def restart_count() -> int:
    """How often torchrun's elastic agent has restarted this group (0 on the first attempt)."""
    if torch_dist.torchrun_environment() is None:
        return 0
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
