"""Compressed exchanges: the samples-weighted mean over replicas of a vector, sent compressed.

The math is unison.compression's; this module only decides what is sent through the
communicator, so ``comm_bytes`` counts the compressed payload itself:

- fp16 / bf16: one all-reduce of the vector in half precision (2 bytes a value), each replica
  pre-scaled by its share of the total weight (as DDP's fp16_compress_hook divides by the world
  size before it sums). The total is the last exchange's (the same on every rank): the replica's
  weight rides along as one more half-precision value, and the sum is rescaled by the last total
  over this one, so a change of weights (a short last batch) is exact too. The weights are sample
  counts, whose sum half precision holds exactly up to 2048 (fp16) or 256 (bf16); above that, and
  at the first exchange, the weights take a 4-byte all-reduce of their own first.
- int8, topk: one all-gather of each replica's bytes (int8: codes + float32 scales; topk:
  float32 values + int32 indices; both + its float32 weight); every rank decodes and averages
  in rank order. They cannot be summed on the wire, so it is an all-gather, (N-1)·B.
- powersgd: two all-reduces, [uncompressed parameters, P factors] and then the Q factors;
  with ``alternate=true`` one: [uncompressed parameters, P factors] and
  [uncompressed parameters, Q factors] on alternate exchanges.

Error-feedback residuals (one per replica, shaped like the vector), PowerSGD's warm-started Q
(alternating, also its last mean P) and its exchange count live in ``replica.strategy_state``,
so checkpoints carry them.
Stacked replicas compress each row as a separate replica would (the result equals the
unstacked run); only what the outer communicator sends is counted.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .. import compression as cx
from .. import merges

if TYPE_CHECKING:
    from ..comm.base import Communicator
    from ..engine.view import ReplicaView

RESIDUAL, Q_MEMORY, EXCHANGES = "compress.residual", "compress.q", "compress.exchanges"
P_MEMORY = "compress.p"  # alternating PowerSGD's last mean P
HALF_TOTAL = "compress.total"  # the total weight of the last half-precision exchange
EXACT_SUM = {torch.float16: 2048, torch.bfloat16: 256}  # integers up to these add exactly


def parameter_shapes(replica: "ReplicaView") -> list[tuple[int, ...]]:
    """One replica's trainable parameter shapes, in the order of the flat vectors."""
    lead = len(replica.local_shape)
    return [tuple(p.shape[lead:]) for p in replica.trainable]


def _weights(weight, vector: torch.Tensor) -> torch.Tensor:
    """The weight as a float32 column: [1] for one replica, [R, 1] for stacked ones."""
    w = torch.as_tensor(weight, dtype=torch.float32, device=vector.device)
    return w.expand(vector.shape[:-1]).unsqueeze(-1).contiguous()


def _residual(replica: "ReplicaView", vector: torch.Tensor) -> torch.Tensor:
    residual = replica.strategy_state.get(RESIDUAL)
    return torch.zeros_like(vector) if residual is None else residual


def _finite_or(new: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    """``new`` where its row is finite, else ``old`` (None: zeros): a step the non-finite guard discards must
    not leave NaN in the state that every later exchange adds. A row counts as finite when its
    sum is (as the guard reads a gradient: an overflowing sum counts as non-finite): one pass
    instead of isfinite's mask, and on the CPU no second pass when every row is."""
    sums = new.sum(dim=-1, keepdim=True, dtype=torch.float32 if new.element_size() < 4 else None)
    finite = torch.isfinite(sums)
    if new.device.type == "cpu" and bool(finite.all()):  # no device sync where it would cost one
        return new
    return torch.where(finite, new, 0.0 if old is None else old)


def _remembered(means: list[torch.Tensor], old: torch.Tensor | None) -> torch.Tensor | None:
    """A power iteration's memory, flat, from the mean factors ([..., rows, r] each): a layer's
    new factor where it is finite and not all zeros, else its ``old`` one (no old: zeros, or
    None when no layer's is kept). A zero factor would stay zero for good (P = M·0, and
    Gram-Schmidt keeps a zero column zero): a step with a zero mean (every weight 0, a layer
    without gradient) or one the non-finite guard discards must not stall that layer's
    compression after it."""
    parts = [f.flatten(-2) for f in means]
    peaks = torch.stack([part.abs().amax(dim=-1) for part in parts], dim=-1)
    kept = torch.isfinite(peaks) & (peaks > 0)
    if means[0].device.type == "cpu" and bool(kept.all()):
        return torch.cat(parts, dim=-1)
    if old is None and not bool(kept.any()):
        return None
    olds = [0.0] * len(parts) if old is None else old.split([part.shape[-1] for part in parts], dim=-1)
    return torch.cat([torch.where(k.unsqueeze(-1), n, o) for n, o, k in zip(parts, olds, kept.unbind(-1))], dim=-1)


def _as_factors(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """A flat factor memory as its factors, each of its shape ([..., rows, r])."""
    return [x.reshape(s) for x, s in zip(flat.split([s[-2] * s[-1] for s in shapes], dim=-1), shapes)]


def _store_residual(replica, corrected: torch.Tensor, sent: torch.Tensor, w: torch.Tensor) -> None:
    """e ← c − decompress(compress(c)); a replica of weight 0 had nothing counted, so it keeps c.
    ``corrected`` is the caller's own sum, no longer needed: it is overwritten."""
    old = replica.strategy_state.get(RESIDUAL)
    counted = w > 0
    if w.device.type == "cpu" and bool(counted.all()):
        new = corrected.sub_(sent)
    else:
        new = torch.where(counted, corrected - sent, corrected)
    replica.strategy_state[RESIDUAL] = _finite_or(new, old)


def compressed_mean(replica: "ReplicaView", comm: "Communicator", vector: torch.Tensor, weight,
                    compression: cx.Compression) -> torch.Tensor:
    """sum_r(w_r·x_r) / sum_r(w_r) over every replica's ``vector`` ([P], or [R, P] stacked), each
    sent compressed; biased compressors add and update this replica's residual."""
    if isinstance(compression, cx.NoCompression) or comm.world_size == 1:
        return comm.all_reduce_mean(vector.clone(), weight)  # alone, nothing leaves the worker
    if isinstance(compression, cx.Half):
        return _half_mean(replica, comm, vector, _weights(weight, vector), compression.dtype)
    if isinstance(compression, cx.PowerSGD):
        return _powersgd(replica, comm, vector, weight, compression)
    return _gathered(replica, comm, vector, weight, compression)


def _half_mean(replica, comm, vector: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp16/bf16: one all-reduce of the pre-scaled vector and the weight (module docstring)."""
    tiny = torch.finfo(torch.float32).tiny
    last = replica.strategy_state.get(HALF_TOTAL)
    if last is None or float(last.max()) > EXACT_SUM[dtype]:  # the same decision on every rank
        total = comm.all_reduce_sum(w.clone())
        half = cx.to_half(vector, dtype, w / total.clamp_min(tiny), comm.world_size)
        replica.strategy_state[HALF_TOTAL] = total
        return comm.all_reduce_sum(half).to(vector.dtype)
    half = cx.to_half(vector, dtype, w / last.clamp_min(tiny), comm.world_size)
    summed = comm.all_reduce_sum(torch.cat([half, w.to(dtype)], dim=-1))
    total = summed[..., -1:].to(torch.float32)
    replica.strategy_state[HALF_TOTAL] = total
    mean = summed[..., :-1].to(vector.dtype)
    return mean if torch.equal(total, last) else mean * (last / total.clamp_min(tiny)).to(vector.dtype)


def _gathered(replica, comm, vector, weight, compression) -> torch.Tensor:
    """int8 and topk: compress with error feedback, all-gather the bytes, decode, average."""
    n = vector.shape[-1]
    corrected = vector + _residual(replica, vector)
    if isinstance(compression, cx.Int8):
        codes, scales = cx.int8_compress(corrected, compression.block)
        own = cx.int8_decompress(codes, scales, n)
        pieces = [scales, codes.view(torch.uint8)]
    else:
        values, indices = cx.topk_compress(corrected, cx.topk_count(n, compression.ratio))
        own = cx.topk_decompress(values, indices, n)
        pieces = [values, indices]
    w = _weights(weight, vector)
    _store_residual(replica, corrected, own, w)
    # 4-byte fields first, so that every field starts at a multiple of its size
    fields = [p.contiguous() for p in pieces[:-1]] + [w, pieces[-1].contiguous()]
    sizes = [f.shape[-1] * f.element_size() for f in fields]
    packed = torch.cat([f.view(torch.uint8) for f in fields], dim=-1)
    decoded, weights = [], []
    for part in comm.all_gather(packed):
        raw = [chunk.clone() for chunk in part.split(sizes)]
        if isinstance(compression, cx.Int8):
            scales, w, codes = raw[0].view(torch.float32), raw[1].view(torch.float32), raw[2].view(torch.int8)
            decoded.append(cx.int8_decompress(codes, scales, n))
        else:
            values, w, indices = raw[0].view(torch.float32), raw[1].view(torch.float32), raw[2].view(torch.int32)
            decoded.append(cx.topk_decompress(values, indices, n))
        weights.append(float(w))
    if not sum(weights) > 0:
        return torch.zeros_like(vector)
    return merges.weighted_mean(decoded, weights).to(vector.dtype).expand_as(vector).clone()


def _powersgd(replica, comm, vector, weight, compression: cx.PowerSGD) -> torch.Tensor:
    """Vogels et al. 2019, Algorithm 1 with error feedback (Algorithm 2), per parameter matrix."""
    state = replica.strategy_state
    count = state.setdefault(EXCHANGES, torch.zeros((), dtype=torch.int64))
    count += 1
    if int(count) <= compression.start:  # DDP's start_powerSGD_iter: plain all-reduce first
        return comm.all_reduce_mean(vector.clone(), weight)
    shapes = parameter_shapes(replica)
    lead = vector.shape[:-1]
    ranks = [cx.powersgd_rank(s, compression.rank, compression.min_rate) for s in shapes]
    corrected = vector + _residual(replica, vector)
    pieces = list(corrected.split([math.prod(s) for s in shapes], dim=-1))
    if Q_MEMORY not in state:
        q = cx.initial_q(shapes, compression.rank, compression.min_rate, compression.seed).to(vector.device)
        state[Q_MEMORY] = q.expand(*lead, q.numel()).clone()
    matrices = [p.reshape(*lead, *cx.matrix_shape(s)) for p, s, r in zip(pieces, shapes, ranks) if r]
    qs = _as_factors(state[Q_MEMORY], [(*lead, m.shape[-1], r) for m, r in zip(matrices, [r for r in ranks if r])])
    plain = [p for p, r in zip(pieces, ranks) if not r]
    if compression.alternate:
        out, local = _one_sided(state, comm, weight, matrices, qs, plain, (int(count) - compression.start) % 2)
    else:
        out, local = _two_sided(state, comm, weight, matrices, qs, plain)
    _store_residual(replica, corrected, _in_order(local, pieces, ranks), _weights(weight, vector))
    return _in_order(out, pieces, ranks)


def _in_order(approximations: list, pieces: list, ranks: list) -> torch.Tensor:
    """The flat vector from the compressed matrices' approximations and the plain pieces, each in
    its parameter's place (``approximations`` lists the matrices first, the plain pieces after)."""
    compressed = sum(1 for r in ranks if r)
    matrices, plain = iter(approximations[:compressed]), iter(approximations[compressed:])
    return torch.cat([(next(matrices) if r else next(plain)).reshape(p.shape) for p, r in zip(pieces, ranks)], dim=-1)


def _all_reduce_factors(comm, weight, factors: list, plain: list) -> list:
    """One all-reduce of [factors, plain pieces]; their means, each in its shape."""
    flat = torch.cat([f.flatten(-2) for f in factors] + plain, dim=-1)
    comm.all_reduce_mean(flat, weight)
    parts = flat.split([f.shape[-2] * f.shape[-1] for f in factors] + [x.shape[-1] for x in plain], dim=-1)
    return [a.reshape(f.shape) for a, f in zip(parts, factors)] + list(parts[len(factors):])


def _two_sided(state, comm, weight, matrices, qs, plain) -> tuple[list, list]:
    """One power iteration a step: P = M·Q̂ all-reduced, P̂ = orth(mean P), Q = Mᵀ·P̂ all-reduced;
    the mean is P̂·mean(Q)ᵀ. Two all-reduces in sequence. Returns (means, own approximations)."""
    ps = [m @ cx.orthogonalize(q.clone()) for m, q in zip(matrices, qs)]
    averaged = _all_reduce_factors(comm, weight, ps, plain)
    p_hats = [cx.orthogonalize(a.clone()) for a in averaged[:len(ps)]]
    local_qs = [m.transpose(-1, -2) @ p for m, p in zip(matrices, p_hats)]
    mean_qs = _all_reduce_factors(comm, weight, local_qs, []) if local_qs else []
    if mean_qs:
        state[Q_MEMORY] = _remembered(mean_qs, state[Q_MEMORY])
    out = [p @ q.transpose(-1, -2) for p, q in zip(p_hats, mean_qs)] + averaged[len(ps):]
    local = [p @ q.transpose(-1, -2) for p, q in zip(p_hats, local_qs)] + plain  # plain: sent as it is
    return out, local


def _one_sided(state, comm, weight, matrices, qs, plain, p_side: int) -> tuple[list, list]:
    """Half a power iteration a step, one all-reduce (``alternate=true``). On odd exchanges every
    rank projects onto the shared Q̂ = orth(last mean Q): sends P = M·Q̂, and the mean is
    mean(P)·Q̂ᵀ = mean(M)·Q̂·Q̂ᵀ. On even ones onto P̂ = orth(last mean P): sends Q = Mᵀ·P̂, the
    mean is P̂·mean(Q)ᵀ. Each step's subspace is the last step's half-iteration, as PowerSGD's
    warm start reuses the last Q (Vogels et al. 2019, §3); the error feedback carries what a
    projection leaves out. Returns (means, own approximations)."""
    if not matrices:
        return _all_reduce_factors(comm, weight, [], plain), plain
    if p_side or P_MEMORY not in state:  # no mean P yet (or none kept): the P side again
        p_side = 1
        bases = [cx.orthogonalize(q.clone()) for q in qs]
        factors = [m @ b for m, b in zip(matrices, bases)]
    else:
        p_shapes = [(*m.shape[:-1], q.shape[-1]) for m, q in zip(matrices, qs)]
        bases = [cx.orthogonalize(p.clone()) for p in _as_factors(state[P_MEMORY], p_shapes)]
        factors = [m.transpose(-1, -2) @ b for m, b in zip(matrices, bases)]
    averaged = _all_reduce_factors(comm, weight, factors, plain)
    means = averaged[:len(factors)]
    key = P_MEMORY if p_side else Q_MEMORY
    kept = _remembered(means, state.get(key))
    if kept is not None:
        state[key] = kept
    if p_side:
        out = [f @ b.transpose(-1, -2) for f, b in zip(means, bases)]
        local = [f @ b.transpose(-1, -2) for f, b in zip(factors, bases)]
    else:
        out = [b @ f.transpose(-1, -2) for f, b in zip(means, bases)]
        local = [b @ f.transpose(-1, -2) for f, b in zip(factors, bases)]
    return out + averaged[len(factors):], local + plain


def merge_change(replica: "ReplicaView", comm: "Communicator", compression: cx.Compression,
                 anchor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The merge of periodic and diloco with compression: every replica sends the change of its
    parameters since the last merge, Δ_r = anchor − θ_r (never the weights), compressed; floating
    buffers are averaged uncompressed. Returns (merged state, mean Δ, this replica's distance
    to anchor − mean Δ)."""
    n = replica.num_parameters
    weight = replica.samples_since_merge
    weight = weight if isinstance(weight, torch.Tensor) else float(weight)
    state = replica.state_vector()
    change = compressed_mean(replica, comm, anchor - state[..., :n], weight, compression)
    merged = state.clone()
    merged[..., :n] = anchor - change
    if state.shape[-1] > n:
        merged[..., n:] = comm.all_reduce_mean(state[..., n:].clone(), weight)
    distance = torch.linalg.vector_norm(state[..., :n] - merged[..., :n], dim=-1)
    return merged, change, distance
