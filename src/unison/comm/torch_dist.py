"""Collectives through torch.distributed: gloo on CPU, NCCL on CUDA.

The only module in unison that imports torch.distributed. Also holds the small helpers that
create or join a process group, so launchers never touch torch.distributed themselves.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
# Imported before any process group exists, on purpose: torch.optim imports torch._dynamo
# lazily at the first optimizer, and when that happens after gloo's group was created the
# interpreter often aborts at exit (SIGABRT; 3 of 8 torchrun runs here, 0 of 8 with this).
import torch._dynamo  # noqa: F401
import torch.distributed as dist

from .base import Communicator, PeerFailed, nbytes

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _collective(name: str, call, *args, **kwargs):
    """Run a torch.distributed call; its failure means a peer is gone or late: PeerFailed."""
    try:
        return call(*args, **kwargs)
    except RuntimeError as exc:  # DistBackendError and gloo's errors are RuntimeErrors
        raise PeerFailed(f"{name} failed, a peer is gone or timed out: {exc}") from exc


class TorchDistComm(Communicator):
    """Communicator over the default process group."""

    def __init__(self) -> None:
        super().__init__(rank=dist.get_rank(), world_size=dist.get_world_size())

    def all_reduce_sum(self, tensor):
        self._count("all_reduce", nbytes(tensor))
        _collective("all_reduce", dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather(self, tensor):
        self._count("all_gather", nbytes(tensor))
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        _collective("all_gather", dist.all_gather, parts, tensor.contiguous())
        return parts

    def broadcast(self, tensor, src=0):
        self._count("broadcast", nbytes(tensor), src)
        _collective("broadcast", dist.broadcast, tensor, src=src)
        return tensor

    def broadcast_object(self, obj, src=0):
        box = [obj]
        _collective("broadcast", dist.broadcast_object_list, box, src=src)
        return box[0]

    def barrier(self):
        _collective("barrier", dist.barrier)


def host_store(world_size: int, timeout: float) -> dist.TCPStore:
    """A rendezvous store on 127.0.0.1 with a free port the OS picks, hosted by the caller.

    Asking the OS for the port inside the store (port 0) leaves no window in which another
    program could take a port we probed as free.
    """
    return dist.TCPStore("127.0.0.1", 0, world_size, is_master=True,
                         timeout=timedelta(seconds=timeout), wait_for_workers=False)


def join(rank: int, world_size: int, port: int, timeout: float) -> TorchDistComm:
    """Join the gloo group whose store the launcher hosts on ``port``."""
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                          timeout=timedelta(seconds=timeout))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout))
    return TorchDistComm()


def torchrun_environment() -> dict[str, str] | None:
    """torchrun's variables if this process was started by torchrun, else None."""
    if all(name in os.environ for name in TORCHRUN_VARIABLES):
        return {name: os.environ[name] for name in TORCHRUN_VARIABLES}
    return None


def join_from_environment(timeout: float) -> tuple[TorchDistComm, torch.device, bool]:
    """Join (or reuse) the group torchrun describes: NCCL when CUDA is present, else gloo.

    Returns the communicator, this rank's device, and whether the group was created here
    (and so is ours to destroy at the end).
    """
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return TorchDistComm(), device, created


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
