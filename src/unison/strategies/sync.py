"""sync: gradients averaged across replicas every step (data-parallel SGD, as DDP does)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import compression, merges
from ..errors import ConfigError
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
    """

    name = "sync"
    merge: merges.Merge = merges.Mean()
    compress: compression.Compression = compression.NoCompression()

    def __post_init__(self) -> None:
        parse_merge(self)
        parse_compress(self)
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

    def on_gradients(self, replica, comm, step, weight):
        if isinstance(self.compress, compression.NoCompression) or comm.world_size == 1:
            combine_gradients(replica, comm, weight, self.merge)
        else:
            grads = replica.grad_vector()
            replica.load_grad_vector(compressed_mean(replica, comm, grads, merge_weight(weight), self.compress))
        return True

    def round_ends(self, step, epoch_end):
        return epoch_end

    def merge_replicas(self, replica, comm):
        return merge_states(replica, comm, parameters=False)
