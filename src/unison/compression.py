"""Compression math: pure functions that make a tensor smaller before it is exchanged, and back.

No communication happens here; strategies/compressed.py sends what these functions produce.
Every function works on the last dimension, so a stacked replica's [R, P] is R vectors at once.
The biased compressors (int8, topk, powersgd) are used with error feedback: a replica adds the
error its last compression made before compressing again, e ← c − decompress(compress(c)) with
c = x + e (Seide et al. 2014; Karimireddy et al. 2019, "Error Feedback Fixes SignSGD").

The rule objects at the end (``NoCompression``, ``Half``, ``Int8``, ``TopK``, ``PowerSGD``) are
what a strategy's ``compress=`` option holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from . import specs
from .errors import ConfigError, expected

# ---- half precision -----------------------------------------------------------------------


def to_half(x: torch.Tensor, dtype: torch.dtype, fraction: torch.Tensor, world_size: int) -> torch.Tensor:
    """``x``·fraction in ``dtype``, ready to be summed over ranks. A replica whose fraction of the
    total weight is 1/world_size is cast first and then divided by world_size in ``dtype``, as
    DDP's fp16_compress_hook does; any other fraction multiplies before the cast."""
    even = (fraction * world_size == 1)
    return torch.where(even, x.to(dtype) / world_size, (x * fraction).to(dtype))


# ---- int8 with one absmax scale per block --------------------------------------------------


def int8_compress(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales): ``x`` cut into blocks of ``block`` values along the last dimension
    (the last one zero-padded), each stored as round(v / s) in int8 with s = absmax / 127
    (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization")."""
    n = x.shape[-1]
    blocks = math.ceil(n / block) if n else 0
    padded = torch.nn.functional.pad(x, (0, blocks * block - n)).reshape(*x.shape[:-1], blocks, block)
    scales = padded.abs().amax(dim=-1) / 127
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(padded / safe[..., None]).clamp_(-127, 127).to(torch.int8)
    return codes.reshape(*x.shape[:-1], blocks * block), scales


def int8_decompress(codes: torch.Tensor, scales: torch.Tensor, n: int) -> torch.Tensor:
    blocks = scales.shape[-1]
    values = codes.reshape(*codes.shape[:-1], blocks, -1).to(scales.dtype) * scales[..., None]
    return values.reshape(*codes.shape[:-1], -1)[..., :n]


# ---- top-k sparsification -------------------------------------------------------------------


def topk_count(n: int, ratio: float) -> int:
    """How many of ``n`` values top-k keeps: ceil(ratio·n), at least one (none of none)."""
    return min(n, max(1, math.ceil(ratio * n))) if n else 0


def topk_compress(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the ``k`` largest magnitudes along the last dimension (Aji and
    Heafield 2017, "Sparse Communication for Distributed Gradient Descent")."""
    indices = x.abs().topk(k, dim=-1).indices
    return x.gather(-1, indices), indices.to(torch.int32)


def topk_decompress(values: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    dense = torch.zeros(*values.shape[:-1], n, dtype=values.dtype, device=values.device)
    return dense.scatter_(-1, indices.to(torch.int64), values)


# ---- PowerSGD (Vogels et al. 2019) ------------------------------------------------------------


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The matrix a parameter is compressed as: (first dimension, the rest), as DDP's hook."""
    n = shape[0] if len(shape) else 1
    return n, math.prod(shape) // n if n else 0


def powersgd_rank(shape: Sequence[int], rank: int, min_rate: float) -> int:
    """The rank a parameter of ``shape`` is approximated with, or 0 to send it uncompressed:
    r = min(n, m, rank), compressed only if (n + m)·r·min_rate < n·m (so 1-D biases never are)."""
    n, m = matrix_shape(shape)
    r = min(n, m, rank)
    return r if (n + m) * r * min_rate < n * m else 0


def orthogonalize(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns of [..., n, r] (n ≥ r), in place, chosen as DDP's PowerSGD hook chooses:
    for r > 2 in float32/float64 one (batched) QR factorisation, LAPACK's Householder QR — a few
    calls instead of Gram-Schmidt's ~5r small ones per matrix, which on a small model cost more
    than the matrix products; else Gram-Schmidt, where a zero column stays zero (QR gives
    some unit column in its place). The two agree up to each column's sign, which no use
    of P or Q here depends on (P̂·P̂ᵀ·M and M·Q̂·Q̂ᵀ are sign-free)."""
    if matrix.shape[-1] > 2 and matrix.dtype in (torch.float32, torch.float64) and matrix.shape[-2] >= matrix.shape[-1]:
        return matrix.copy_(torch.linalg.qr(matrix).Q)
    return gram_schmidt(matrix)


def gram_schmidt(matrix: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt on the columns of [..., n, r], in place; a zero column stays zero."""
    for i in range(matrix.shape[-1]):
        col = matrix[..., i:i + 1]
        norm = torch.linalg.vector_norm(col, dim=-2, keepdim=True)
        col /= torch.where(norm > 0, norm, torch.ones_like(norm))
        if i + 1 < matrix.shape[-1]:
            rest = matrix[..., i + 1:]
            rest -= (col * rest).sum(dim=-2, keepdim=True) * col
    return matrix


def initial_q(shapes: Sequence[Sequence[int]], rank: int, min_rate: float, seed: int) -> torch.Tensor:
    """Every compressed parameter's starting Q (m × r, standard normal), flat and in order,
    from one generator seeded ``seed``: the same on every replica without communication."""
    generator = torch.Generator().manual_seed(seed)
    qs = [torch.randn(matrix_shape(s)[1] * r, generator=generator)
          for s in shapes if (r := powersgd_rank(s, rank, min_rate))]
    return torch.cat(qs) if qs else torch.zeros(0)


# ---- rule objects: what ``compress=`` holds -------------------------------------------------


class Compression(specs.Spec):
    """How a strategy's exchanged vector is compressed. Subclasses are frozen dataclasses."""

    biased: ClassVar[bool] = False   # kept unbiased by error feedback (residuals per replica)


@dataclass(frozen=True)
class NoCompression(Compression):
    """Exchange the vector as it is (float32): today's behaviour, bit for bit."""

    name = "none"


@dataclass(frozen=True)
class Half(Compression):
    """Cast to float16, sum over ranks in float16 (2 bytes a value), cast back."""

    name = "fp16"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16


@dataclass(frozen=True)
class BFloat16(Half):
    """As fp16, in bfloat16: float32's range, 8 bits of mantissa."""

    name = "bf16"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16


@dataclass(frozen=True)
class Int8(Compression):
    """1 byte a value plus one float32 scale per ``block`` values; gathered, not summed."""

    name = "int8"
    biased = True
    block: int = 256

    def __post_init__(self):
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ConfigError(expected("int8.block", self.block, "an integer >= 1"))


@dataclass(frozen=True)
class TopK(Compression):
    """The ceil(ratio·n) largest magnitudes, as float32 values and int32 indices, gathered."""

    name = "topk"
    biased = True
    ratio: float = 0.01

    def __post_init__(self):
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise ConfigError(expected("topk.ratio", r, "a number in (0, 1]"))


@dataclass(frozen=True)
class PowerSGD(Compression):
    """Rank-``rank`` PowerSGD per parameter matrix with warm-started Q (Vogels et al. 2019,
    "PowerSGD: Practical Low-Rank Gradient Compression"). The first ``start`` exchanges are
    sent uncompressed (DDP's start_powerSGD_iter); a parameter is compressed only where
    (n + m)·r·min_rate < n·m (DDP's min_compression_rate); ``seed`` draws the first Q.
    ``alternate=True`` sends P and Q on alternate exchanges, one all-reduce a step instead of two
    in sequence (n·r or m·r factor values a step instead of (n + m)·r): for links where a
    collective's latency, not its bytes, is the price. It is unison's variant, not DDP's hook."""

    name = "powersgd"
    biased = True
    rank: int = 1
    start: int = 0
    min_rate: float = 2.0
    seed: int = 0
    alternate: bool = False

    def __post_init__(self):
        if not isinstance(self.alternate, bool):
            raise ConfigError(expected("powersgd.alternate", self.alternate, "true or false"))
        for field, value, low in (("rank", self.rank, 1), ("start", self.start, 0), ("seed", self.seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(expected(f"powersgd.{field}", value, f"an integer >= {low}"))
        m = self.min_rate
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not (m > 0 and math.isfinite(m)):
            raise ConfigError(expected("powersgd.min_rate", m, "a finite number > 0"))


REGISTRY: dict[str, type[Compression]] = {cls.name: cls for cls in (NoCompression, Half, BFloat16, Int8, TopK,
                                                                    PowerSGD)}
NAMES = tuple(REGISTRY)


def parse(spec: Any, field: str = "compress") -> Compression:
    """A Compression from ``"fp16"``, ``"int8"``, ``"topk(0.01)"``, ``"powersgd(4)"``, ... or the
    object; ``field`` names the option in the error (e.g. ``"sync.compress"``). None (what the
    spec grammar makes of ``none``) is no compression."""
    return specs.parse("none" if spec is None else spec, REGISTRY, field, Compression)
