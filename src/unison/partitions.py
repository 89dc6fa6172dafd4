"""How the training data is split among workers, epoch by epoch.

Every rank computes its own indices from (n, world_size, rank, epoch, seed) alone, so no index
list is ever sent, and every rank also knows every other rank's share size (needed to keep
collectives in step when shares are uneven).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from . import specs
from .errors import ConfigError, DataError, expected


def _replica_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """A generator of one replica's own order in one epoch; rank 0 gets the single-worker one."""
    return torch.Generator().manual_seed(seed + epoch + 1_000_003 * rank)


class Partition(specs.Spec, ABC):
    """Decides which sample indices replica ``rank`` trains on in ``epoch``, in order."""


    @abstractmethod
    def indices(self, n: int, world_size: int, rank: int, epoch: int, seed: int) -> torch.Tensor:
        """The int64 indices replica ``rank`` visits in ``epoch``, in visiting order."""

    @abstractmethod
    def sizes(self, n: int, world_size: int) -> list[int]:
        """How many samples each replica visits per epoch (the same every epoch)."""

    def bind(self, labels: torch.Tensor, world_size: int, seed: int) -> "Partition":
        """The partition for these training labels; only label-aware partitions need them."""
        return self

    def check(self, n: int, world_size: int) -> None:
        """Raise DataError before any worker starts if some replica would get no data."""
        sizes = self.sizes(n, world_size)
        if min(sizes) < 1:
            raise DataError(f"partition {self.spec()!r} leaves a worker with no samples: "
                            f"{n} training samples for workers={world_size}")

    def __repr__(self) -> str:
        return self.spec()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.spec() == self.spec()

    def __hash__(self) -> int:
        return hash(self.spec())


@dataclass(frozen=True, eq=False)
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


@dataclass(frozen=True, eq=False)
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
    Indices must be integers (ints, numpy or torch integer arrays); floats, even 2.0, and bools
    are refused, since converting them would silently truncate 1.7 to 1 or read a mask as 0/1.
    """

    name = "explicit"

    def __init__(self, shares: Sequence[Sequence[int]]):
        self.shares = [self._indices(rank, s) for rank, s in enumerate(shares)]

    @staticmethod
    def _indices(rank: int, share: Any) -> torch.Tensor:
        """One share as an int64 tensor of its own, or a ConfigError naming what is not integer."""
        def integral(value: Any) -> bool:
            dtype = getattr(value, "dtype", None)  # numpy and torch arrays and scalars
            if isinstance(dtype, torch.dtype):
                return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
            if dtype is not None:
                return np.issubdtype(dtype, np.integer)  # False for numpy's bool_ and floats
            return isinstance(value, int) and not isinstance(value, bool)

        if isinstance(share, (torch.Tensor, np.ndarray)):
            bad = None if integral(share) else f"of dtype {share.dtype}"
        else:
            share = list(share)
            bad = next((f"with index {value!r}" for value in share if not integral(value)), None)
        if bad is not None:
            raise ConfigError(expected("partition", f"explicit share {rank} {bad}",
                                       "integer sample indices (int, numpy or torch integers; "
                                       "not floats, even 2.0, nor bools)"))
        return torch.as_tensor(share, dtype=torch.int64).cpu().clone()

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


class LabelShares(Partition):
    """Shares drawn once from the training labels (``bind``, which fit() calls), fixed for the
    run and reshuffled every epoch. Subclasses hold the drawn shares in ``_shares``."""

    _shares: tuple | None = None

    def _bound(self) -> tuple:
        if self._shares is None:
            raise ConfigError(f"partition {self.name!r} needs the training labels: call bind(labels, workers, "
                              "seed) first (fit() does this)")
        return self._shares

    def _with_shares(self, shares: list[torch.Tensor]) -> "LabelShares":
        bound = dataclasses.replace(self)
        object.__setattr__(bound, "_shares", tuple(shares))
        return bound

    def check(self, n, world_size):
        if len(self._bound()) != world_size:
            raise ConfigError(f"partition {self.spec()!r} was drawn for {len(self._bound())} workers, "
                              f"not {world_size}")
        super().check(n, world_size)

    def indices(self, n, world_size, rank, epoch, seed):
        share = self._bound()[rank]
        return share[torch.randperm(len(share), generator=_replica_generator(seed, epoch, rank))]

    def sizes(self, n, world_size):
        return [len(s) for s in self._bound()]


@dataclass(frozen=True, eq=False)
class Dirichlet(LabelShares):
    """Label-skewed, non-IID shares as in Hsu et al. 2019, "Measuring the Effects of
    Non-Identical Data Distribution for Federated Visual Classification": every worker draws
    its own class mix q ~ Dirichlet(alpha·p), p the classes' frequencies, and receives n // N
    samples drawn without replacement by that mix (a class that runs out is left out of the
    mix). Small alpha gives each worker few classes; large alpha approaches the global mix.
    Shares are equal in size, drawn once from the seed and reshuffled every epoch.
    """

    name = "dirichlet"
    alpha: float = 0.5
    _shares: tuple | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not 0 < self.alpha < float("inf"):
            raise ConfigError(expected("dirichlet.alpha", self.alpha, "a finite number > 0"))

    def bind(self, labels, world_size, seed):
        return self._with_shares(dirichlet_shares(labels, world_size, self.alpha, seed))


def dirichlet_shares(labels: Any, world_size: int, alpha: float, seed: int) -> list[torch.Tensor]:
    """Hsu et al.'s draw: worker r gets n // N samples whose classes follow q_r ~ Dir(alpha·p)."""
    y = _class_labels(labels, "dirichlet").numpy()
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    pools = [list(rng.permutation(np.flatnonzero(y == c))) for c in classes]
    mixes = rng.dirichlet(alpha * counts / counts.sum(), size=world_size)
    size = len(y) // world_size
    shares = []
    for rank in rng.permutation(world_size):  # a random order, so no worker always gets leftovers
        wanted = np.zeros(len(classes), dtype=np.int64)
        while wanted.sum() < size:
            available = np.array([len(p) for p in pools]) - wanted
            mix = np.where(available > 0, mixes[rank], 0.0)
            if not mix.sum() > 0:  # this worker's mix has only exhausted classes: use what is left
                mix = available.astype(float)
            extra = rng.multinomial(size - wanted.sum(), mix / mix.sum())
            wanted += np.minimum(extra, available)
        taken = [pools[c][:k] for c, k in enumerate(wanted)]
        pools = [p[k:] for p, k in zip(pools, wanted)]
        shares.append((rank, np.sort(np.concatenate(taken).astype(np.int64))))
    return [torch.as_tensor(share) for _, share in sorted(shares, key=lambda item: item[0])]


@dataclass(frozen=True, eq=False)
class Pathological(LabelShares):
    """McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data" (the pathological non-IID split of MNIST): the samples sorted by label
    are cut into workers·k shards of equal size, and each worker gets k shards at random, so
    it sees about k classes. Ties are ordered by a seeded permutation, leftovers (n mod
    workers·k) are left out; shares are drawn once from the seed and reshuffled every epoch.
    """

    name = "pathological"
    k: int = 2
    _shares: tuple | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(expected("pathological.k", self.k, "an integer >= 1 (shards per worker)"))

    def bind(self, labels, world_size, seed):
        return self._with_shares(pathological_shares(labels, world_size, self.k, seed))


def pathological_shares(labels: Any, world_size: int, k: int, seed: int) -> list[torch.Tensor]:
    """McMahan et al.'s draw: label-sorted shards, k of them to each worker at random."""
    y = _class_labels(labels, "pathological")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=generator)            # ties in a seeded order
    order = order[torch.sort(y[order], stable=True).indices]       # then sorted by label
    shards = world_size * k
    size = len(y) // shards
    if size < 1:
        raise DataError(f"partition 'pathological(k={k})' needs at least workers·k = {shards} training "
                        f"samples; there are {len(y)}")
    pieces = order[:size * shards].reshape(shards, size)
    dealt = torch.randperm(shards, generator=generator).reshape(world_size, k)
    return [pieces[row].reshape(-1).sort().values for row in dealt]


@dataclass(frozen=True, eq=False)
class PowerLaw(Partition):
    """Disjoint IID shares whose sizes follow a power law, the unbalanced setting of Li et
    al. 2020 ("Federated Optimization in Heterogeneous Networks", FedProx), where the samples
    per device follow a power law: worker r's share is ∝ (r+1)^−alpha (worker 0's the
    largest), at least one sample each, all n samples used; which samples, is drawn from the
    seed. Merges weight each replica by the samples it trained on.
    """

    name = "powerlaw"
    alpha: float = 1.0

    def __post_init__(self):
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not 0 <= self.alpha < float("inf"):
            raise ConfigError(expected("powerlaw.alpha", self.alpha, "a finite number >= 0 (0: equal shares)"))

    def sizes(self, n, world_size):
        return powerlaw_sizes(n, world_size, self.alpha)

    def indices(self, n, world_size, rank, epoch, seed):
        ends = torch.tensor(self.sizes(n, world_size)).cumsum(0).tolist()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # the same every epoch
        share = order[(ends[rank - 1] if rank else 0):ends[rank]]
        return share[torch.randperm(len(share), generator=_replica_generator(seed, epoch, rank))]


def powerlaw_sizes(n: int, world_size: int, alpha: float) -> list[int]:
    """n split into world_size sizes ∝ (r+1)^−alpha, largest first, each >= 1 (when n allows),
    rounded by largest remainder so that they add up to n."""
    if n < world_size:
        return [1] * n + [0] * (world_size - n)
    weights = [(r + 1) ** -alpha for r in range(world_size)]
    spare = n - world_size  # one sample each first, the rest by the power law
    exact = [spare * w / sum(weights) for w in weights]
    sizes = [1 + int(e) for e in exact]
    for r in sorted(range(world_size), key=lambda r: int(exact[r]) - exact[r])[:n - sum(sizes)]:
        sizes[r] += 1
    return sizes


def _class_labels(labels: Any, name: str) -> torch.Tensor:
    y = torch.as_tensor(labels)
    if y.dim() != 1 or y.is_floating_point() or y.is_complex():
        raise ConfigError(f"partition {name!r} needs integer class labels (a classification task)")
    return y.cpu()


def describe(partition: Any, labels: Any, workers: int, seed: int = 0) -> str:
    """A table of how many samples of each class every worker trains on (epoch 0)."""
    y = torch.as_tensor(labels)
    bound = parse(partition).bind(y, workers, seed)
    bound.check(len(y), workers)
    classes = torch.unique(y).tolist()
    header = ["worker"] + [str(c) for c in classes] + ["total", "classes"]
    rows = []
    for rank in range(workers):
        mine = y[bound.indices(len(y), workers, rank, 0, seed)]
        counts = [int((mine == c).sum()) for c in classes]
        rows.append([str(rank)] + [str(c) for c in counts] + [str(len(mine)), str(sum(c > 0 for c in counts))])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = [f"partition {bound.spec()}, {workers} workers, samples per class:"]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header] + rows]
    return "\n".join(lines)


REGISTRY: dict[str, type[Partition]] = {cls.name: cls for cls in (Shard, Full, Dirichlet, Pathological, PowerLaw)}
NAMES = tuple(REGISTRY)


def parse(partition: str | Partition) -> Partition:
    """A Partition from ``"shard"``, ``"full"``, ``"dirichlet(0.3)"``, or the object itself."""
    return specs.parse(partition, REGISTRY, "partition", Partition)
