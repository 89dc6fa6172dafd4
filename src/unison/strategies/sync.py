"""sync: gradients averaged across replicas every step (data-parallel SGD, as DDP does)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import compression, merges
from ..errors import ConfigError, expected
from . import buckets
from .base import Strategy, combine_gradients, merge_states, merge_weight, parse_compress, parse_merge
from .compressed import compressed_mean


@dataclass(frozen=True)
class Sync(Strategy):
    """θ ← θ − α·(1/b)·Σ∇J(θ; xᵢ, yᵢ) over the union of the replicas' batches: exactly SGD with
    batch workers·batch_size (Goyal et al. 2017, "Accurate, Large Minibatch SGD").

    ``merge`` combines the gradients: "mean" (the default, one all-reduce) or a robust rule
    such as ``krum(f=1)`` or ``median`` against faulty replicas (Blanchard et al. 2017).
    Parameters stay identical by construction; at each epoch end (a round) the floating
    buffers, such as BatchNorm statistics computed on local batches, are averaged.

    ``compress`` sends the gradients compressed (unison.compression: fp16, bf16, int8, topk,
    powersgd; the biased ones with error feedback), with merge=mean only. fp16 is DDP's
    fp16_compress_hook; powersgd is DDP's powerSGD_hook per parameter, except that a replica's
    residual is its own compression error (the paper's; DDP keeps c − the decompressed mean,
    whose mean over replicas is the same) and its first Q is drawn from ``seed``.

    ``bucket_mb`` (merge=mean without compression; default 25, DDP's bucket_cap_mb): the
    all-reduce runs in buckets of about this many MiB while the backward pass goes on, each
    bucket as soon as its gradients are final, as DDP overlaps it (Li et al. 2020; see
    strategies/buckets.py). The result is the same weighted mean, the bytes the same; 0 exchanges
    once after the backward pass. Stacked replicas exchange after the backward pass.
    """

    name = "sync"
    merge: merges.Merge = merges.Mean()
    compress: compression.Compression = compression.NoCompression()
    bucket_mb: float | None = None  # None: 25 where the exchange is one all-reduce of the mean

    def __post_init__(self) -> None:
        parse_merge(self)
        parse_compress(self)
        mb = self.bucket_mb
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, (int, float)) or not math.isfinite(mb)
                               or mb < 0):
            raise ConfigError(expected(f"{self.name}.bucket_mb", mb, "a number >= 0 (MiB; 0: no overlap)"))
        if mb and not self.overlappable:
            raise ConfigError(f"{self.name}.bucket_mb={mb} overlaps the all-reduce of the mean with the backward "
                              f"pass, and merge={self.merge}, compress={self.compress} exchange after it; "
                              "accepted: bucket_mb with merge=mean and compress=none, or leave bucket_mb out")
        if self.merge.needs_validation:
            raise ConfigError(f"{self.name}(merge={self.merge}) is not possible: {self.name} combines "
                              "gradients, and a soup combines models; use periodic or oneshot")

    def check(self, world_size, has_validation, steps):
        super().check(world_size, has_validation, steps)
        if not isinstance(self.merge, merges.Mean) and len(set(steps)) > 1:
            raise ConfigError(f"{self.spec()} needs every worker to have a batch at every step (a worker "
                              f"without one would vote for a zero gradient), but the shares give "
                              f"{min(steps)} to {max(steps)} batches per epoch; use partition='shard' or "
                              "merge='mean'")

    @property
    def overlappable(self) -> bool:
        return isinstance(self.merge, merges.Mean) and isinstance(self.compress, compression.NoCompression)

    @property
    def overlap_mb(self) -> float:
        """The bucket size in MiB this run's exchange overlaps with; 0: after the backward pass."""
        if not self.overlappable:
            return 0.0
        return buckets.DEFAULT_MB if self.bucket_mb is None else float(self.bucket_mb)

    def begin(self, replica, comm):
        if comm.world_size > 1 and self.overlap_mb > 0:
            buckets.watch(replica, comm, self.overlap_mb)

    def on_gradients(self, replica, comm, step, weight):
        overlapped = buckets.watched(replica)
        if overlapped is not None:
            overlapped.finish(replica, weight)
        elif isinstance(self.compress, compression.NoCompression) or comm.world_size == 1:
            combine_gradients(replica, comm, weight, self.merge)
        else:
            grads = replica.grad_vector()
            replica.load_grad_vector(compressed_mean(replica, comm, grads, merge_weight(weight), self.compress))
        return True

    def round_ends(self, step, epoch_end):
        return epoch_end

    def merge_replicas(self, replica, comm):
        return merge_states(replica, comm, parameters=False)
