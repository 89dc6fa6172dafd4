"""Backend "stacked": every replica in this process, trained as one batched computation.

``workers=N`` replicas become the rows of stacked tensors (unison.engine.stacked) on the CPU or
on one CUDA device; their collectives are reductions over the replica dimension
(comm/stacked.py), so nothing is communicated. The same pieces run hierarchically: with
``replicas_per_worker=R`` each process of the ``processes`` or ``torchrun`` backend holds R
stacked replicas, and the communicator adds one collective across the processes.
"""

from __future__ import annotations

import torch

from ..engine.job import Job, Outcome
from ..errors import ConfigError
from ..strategies.base import POINT_TO_POINT, SHARED_MEMORY
from .base import Backend
from .worker import in_this_process


class Stacked(Backend):
    name = "stacked"
    lacks = {SHARED_MEMORY: "its workers must all update one shared model, and stacked replicas are "
                            "separate copies trained as one batched computation",
             POINT_TO_POINT: "its replicas are one batched computation that steps together, so none can "
                             "send or wait on its own time"}
    stacks_all = True
    devices = ("cpu", "cuda")

    def launch(self, job: Job) -> Outcome:
        """Train the job's stacked replicas here, on its device, with every core."""
        return in_this_process(job, torch.device(job.device))

    def check(self, job: Job) -> None:
        check_device(job.device)


BACKEND = Stacked()


def check_device(device_name: str) -> None:
    """A CUDA device must be there."""
    device = torch.device(device_name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device_name!r} needs a CUDA device, and torch.cuda.is_available() "
                              "is False here; use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={device_name!r} is not there: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
