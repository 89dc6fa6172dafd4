"""How the training data is split among workers, epoch by epoch.

Every rank computes its own indices from (n, world_size, rank, epoch, seed) alone, so no index
list is ever sent, and every rank also knows every other rank's share size (needed to keep
collectives in step when shares are uneven).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch

from .errors import ConfigError, DataError, expected

NAMES = ("shard", "full")


def _replica_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """A generator of one replica's own order in one epoch; rank 0 gets the single-worker one."""
    return torch.Generator().manual_seed(seed + epoch + 1_000_003 * rank)


class Partition(ABC):
    """Decides which sample indices replica ``rank`` trains on in ``epoch``, in order."""

    name: str = ""

    @abstractmethod
    def indices(self, n: int, world_size: int, rank: int, epoch: int, seed: int) -> torch.Tensor:
        """The int64 indices replica ``rank`` visits in ``epoch``, in visiting order."""

    @abstractmethod
    def sizes(self, n: int, world_size: int) -> list[int]:
        """How many samples each replica visits per epoch (the same every epoch)."""

    def check(self, n: int, world_size: int) -> None:
        """Raise DataError before any worker starts if some replica would get no data."""
        sizes = self.sizes(n, world_size)
        if min(sizes) < 1:
            raise DataError(f"partition {self.spec()!r} leaves a worker with no samples: "
                            f"{n} training samples for workers={world_size}")

    def spec(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return self.spec()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.spec() == self.spec()

    def __hash__(self) -> int:
        return hash(self.spec())


class Shard(Partition):
    """Disjoint shards, reshuffled every epoch.

    Exactly torch.utils.data.DistributedSampler(shuffle=True, seed=seed, drop_last=True) after
    set_epoch(epoch): one permutation of all n samples per epoch, cut to a multiple of
    world_size, and rank r takes every world_size-th index starting at r.
    """

    name = "shard"

    def indices(self, n, world_size, rank, epoch, seed):
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=generator)
        total = (n // world_size) * world_size
        return order[rank:total:world_size]

    def sizes(self, n, world_size):
        return [n // world_size] * world_size


class Full(Partition):
    """Every replica visits all samples every epoch, each in its own order.

    Rank 0's order is the single-worker order (seed + epoch), so one worker on "full" equals
    one worker on "shard".
    """

    name = "full"

    def indices(self, n, world_size, rank, epoch, seed):
        generator = _replica_generator(seed, epoch, rank)
        return torch.randperm(n, generator=generator)

    def sizes(self, n, world_size):
        return [n] * world_size


class Explicit(Partition):
    """Fixed, user-given index lists, one per worker, each shuffled every epoch.

    Shares may differ in size: merges then weight each replica by the samples it trained on.
    """

    name = "explicit"

    def __init__(self, shares: Sequence[Sequence[int]]):
        self.shares = [torch.as_tensor(list(s), dtype=torch.int64) for s in shares]

    def check(self, n, world_size):
        if len(self.shares) != world_size:
            raise ConfigError(expected("partition", f"explicit with {len(self.shares)} shares",
                                       f"one share per worker (workers={world_size})"))
        for share in self.shares:
            if len(share) and (int(share.min()) < 0 or int(share.max()) >= n):
                raise DataError(f"partition explicit: index out of range for {n} training samples")
        super().check(n, world_size)

    def indices(self, n, world_size, rank, epoch, seed):
        share = self.shares[rank]
        generator = _replica_generator(seed, epoch, rank)
        return share[torch.randperm(len(share), generator=generator)]

    def sizes(self, n, world_size):
        return [len(s) for s in self.shares]

    def __eq__(self, other):
        return (type(other) is Explicit and len(other.shares) == len(self.shares)
                and all(torch.equal(a, b) for a, b in zip(self.shares, other.shares)))

    __hash__ = Partition.__hash__

    def spec(self):
        return f"explicit({'/'.join(str(len(s)) for s in self.shares)})"


def parse(partition: str | Partition) -> Partition:
    """A Partition from its name, or the object itself."""
    if isinstance(partition, Partition):
        return partition
    if partition == "shard":
        return Shard()
    if partition == "full":
        return Full()
    raise ConfigError(expected("partition", partition, NAMES + ("a unison.partitions.Partition",)))
