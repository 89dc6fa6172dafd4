"""compress=: the math, the spec strings, the bytes sent, and each compressed strategy against a
plain sequential simulation (loop over replicas, compress each, average, keep residuals)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import unison
from unison import checkpoint as files
from unison import compression as cx
from unison.errors import ConfigError
from unison.models import mlp
from unison.strategies import parse

from reference import max_abs_diff, sampler_order
from test_resume import interrupted_at, same_history


def fit(model, data, **kwargs):
    kwargs = {"backend": "threads", "workers": 2, "epochs": 2, "batch_size": 8, "lr": 0.1, "progress": False,
              "val": None} | kwargs
    return unison.fit(model, data, **kwargs)


# ---- the pure math ------------------------------------------------------------------------------

def test_int8_keeps_each_value_within_half_a_step_of_its_blocks_scale():
    x = torch.randn(2, 1000) * torch.linspace(0.01, 10, 1000)
    codes, scales = cx.int8_compress(x, 256)
    assert codes.dtype == torch.int8 and codes.shape == (2, 1024) and scales.shape == (2, 4)
    back = cx.int8_decompress(codes, scales, 1000)
    step = scales.repeat_interleave(256, dim=-1)[:, :1000]
    assert ((back - x).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(cx.int8_decompress(*cx.int8_compress(torch.zeros(5), 4), 5), torch.zeros(5))


def test_topk_keeps_the_largest_magnitudes_and_orthogonalize_gives_orthonormal_columns():
    x = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2])
    values, indices = cx.topk_compress(x, cx.topk_count(5, 0.4))
    assert sorted(indices.tolist()) == [1, 3]
    assert torch.equal(cx.topk_decompress(values, indices, 5), torch.tensor([0, -5.0, 0, 2.0, 0]))
    m = cx.orthogonalize(torch.randn(3, 20, 4))
    assert torch.allclose(m.transpose(-1, -2) @ m, torch.eye(4).expand(3, 4, 4), atol=1e-5)
    assert torch.equal(cx.orthogonalize(torch.zeros(5, 2)), torch.zeros(5, 2))  # no NaN from a zero column


def test_orthogonalize_takes_qr_above_rank_2_equal_to_gram_schmidt_up_to_column_signs():
    a = torch.randn(3, 30, 4, dtype=torch.float64)
    qr, gs = cx.orthogonalize(a.clone()), cx.gram_schmidt(a.clone())
    signs = torch.sign(torch.diagonal(qr.transpose(-1, -2) @ gs, dim1=-2, dim2=-1)).unsqueeze(-2)
    assert torch.allclose(qr * signs, gs, atol=1e-10)
    assert not torch.equal(qr, gs)  # it is the QR path, not Gram-Schmidt's numbers
    zero = cx.orthogonalize(torch.zeros(6, 3))  # rank 3 of a zero matrix: unit columns, no NaN
    assert torch.allclose(zero.T @ zero, torch.eye(3), atol=1e-6)


def test_powersgd_compresses_matrices_only_where_it_saves_min_rate_times():
    assert cx.powersgd_rank((16,), 4, 2) == 0            # a bias: (16 + 1)·1·2 > 16
    assert cx.powersgd_rank((64, 64), 4, 2) == 4
    assert cx.powersgd_rank((10, 64), 4, 2) == 4         # (10 + 64)·4·2 = 592 < 640
    assert cx.powersgd_rank((10, 64), 8, 2) == 0
    assert cx.powersgd_rank((8, 3, 3, 3), 2, 2) == 2     # a conv kernel as 8 × 27
    assert cx.initial_q([(16,), (64, 64)], 4, 2, seed=0).shape == (256,)


def test_spec_strings_and_bad_values_name_the_field_and_the_accepted_values():
    assert parse("sync(compress=powersgd(4))").compress == cx.PowerSGD(rank=4)
    assert parse("diloco(every=100, compress=int8)").compress == cx.Int8()
    assert parse("periodic(every=8, compress=topk(0.01))").compress == cx.TopK(0.01)
    for spec in ("sync(compress=powersgd(rank=2, start=5))", "sync(compress=powersgd(4, alternate=true))",
                 "periodic(every=3, compress=int8(block=64))", "diloco(compress=bf16)"):
        assert parse(parse(spec).spec()) == parse(spec)
    for spec, words in [("sync(compress=zip)", ["sync.compress", "'fp16'", "'powersgd'"]),
                        ("periodic(compress=topk(0))", ["topk.ratio", "(0, 1]"]),
                        ("sync(compress=powersgd(0))", ["powersgd.rank", ">= 1"]),
                        ("sync(compress=powersgd(2, alternate=1))", ["powersgd.alternate", "true or false"]),
                        ("diloco(compress=int8(block=0))", ["int8.block"]),
                        ("sync(compress=topk(foo=1))", ["no option 'foo'", "ratio"]),
                        ("periodic(merge=median, compress=int8)", ["periodic.compress", "merge=mean", "none"])]:
        with pytest.raises(ConfigError) as info:
            parse(spec)
        assert all(w in str(info.value) for w in words), (spec, str(info.value))


# ---- none is today's code path; bytes are what is sent ---------------------------------------------

@pytest.mark.parametrize("strategy", ["sync", "periodic(every=3)", "diloco(every=3)"])
def test_compress_none_is_bit_identical_to_no_compress_option(blobs, small_model, strategy):
    plain = fit(small_model, blobs, strategy=strategy, momentum=0.9)
    none = fit(small_model, blobs, strategy=strategy[:-1] + ", compress=none)" if "(" in strategy
               else strategy + "(compress=none)", momentum=0.9)
    assert max_abs_diff(plain.model, none.model) == 0.0
    same_history(none.history, plain.history)
    assert [r["comm_bytes"] for r in plain.history] == [r["comm_bytes"] for r in none.history]


def test_comm_bytes_count_the_compressed_payload(blobs, small_model):
    # 96 samples, 2 workers, batch 8: 6 steps an epoch, 12 in all; the model has P = 195 parameters
    P, steps, start = 195, 12, 195 * 4  # the start's broadcast from rank 0: 780 bytes
    ring = lambda b: 2 * (2 - 1) * b // 2  # noqa: E731  all-reduce, per worker, N=2
    k = math.ceil(0.1 * P)
    shapes = [(16, 8), (16,), (3, 16), (3,)]  # powersgd(1): both weights compressed, biases not
    p_len, q_len = 16 + 3 + 16 + 3, 8 + 16
    expected = {
        "none": steps * ring((P + 1) * 4),
        # the weights alone at the first step; then they ride in the payload as one more value
        "fp16": ring(4) + ring(P * 2) + (steps - 1) * ring((P + 1) * 2),
        "int8": steps * (2 - 1) * (4 + 4 + 256),              # one scale, the weight, 256 codes
        "topk(0.1)": steps * (2 - 1) * (4 * k + 4 + 4 * k),  # values, the weight, int32 indices
        "powersgd(1)": steps * (ring((p_len + 1) * 4) + ring((q_len + 1) * 4)),
    }
    assert [cx.powersgd_rank(s, 1, 2) for s in shapes] == [1, 0, 1, 0]
    for name, sent in expected.items():
        result = fit(small_model, blobs, strategy=f"sync(compress={name})")
        assert result.final["comm_bytes"] == start + sent, name


# ---- the sequential simulation ------------------------------------------------------------------------

def _int8_plain(c, block):
    """Blockwise absmax int8, written out: pad, scale = absmax/127, round, back."""
    n = len(c)
    out = torch.zeros(n)
    for start in range(0, n, block):
        piece = c[start:start + block]
        scale = piece.abs().max() / 127
        out[start:start + block] = torch.round(piece / scale).clamp(-127, 127) * scale if scale > 0 else 0
    return out


def _topk_plain(c, ratio):
    k = max(1, math.ceil(ratio * len(c)))
    keep = c.abs().topk(k).indices
    out = torch.zeros_like(c)
    out[keep] = c[keep]
    return out


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _load(model, flat):
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def simulate(model, x, y, *, compress, every, workers=2, epochs=2, batch_size=8, lr=0.1, momentum=0.0):
    """Sync (every=None: gradients) or periodic (every=H: changes since the last merge), with
    each replica compressing what it sends and keeping its residual; equal shares, so the mean
    is plain."""
    replicas = [copy.deepcopy(model) for _ in range(workers)]
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum) for m in replicas]
    P = sum(p.numel() for p in model.parameters())
    residuals = [torch.zeros(P) for _ in range(workers)]
    anchor = _flat(model.parameters()).detach().clone()
    step = 0

    def exchange(vectors):
        sent = []
        for r, v in enumerate(vectors):
            c = v + residuals[r]
            d = compress(c)
            residuals[r] = c - d
            sent.append(d)
        getattr(compress, "exchanged", lambda: None)()  # a stateful compressor's shared step
        return sum(sent[1:], sent[0]) / workers

    for epoch in range(epochs):
        orders = [sampler_order(len(x), workers, r, epoch, 0) for r in range(workers)]
        for i in range(len(orders[0]) // batch_size):
            step += 1
            for m, opt, order in zip(replicas, opts, orders):
                opt.zero_grad()
                idx = order[i * batch_size:(i + 1) * batch_size]
                F.cross_entropy(m(x[idx]), y[idx]).backward()
            if every is None:
                mean = exchange([_flat([p.grad for p in m.parameters()]) for m in replicas])
                for m in replicas:
                    offset = 0
                    for p in m.parameters():
                        p.grad.copy_(mean[offset:offset + p.numel()].view_as(p))
                        offset += p.numel()
            for opt in opts:
                opt.step()
            if every is not None and step % every == 0:
                mean = exchange([anchor - _flat(m.parameters()).detach() for m in replicas])
                anchor = anchor - mean
                for m in replicas:
                    _load(m, anchor)
    return replicas[0]


@pytest.mark.parametrize("name, plain", [("int8(block=64)", lambda c: _int8_plain(c, 64)),
                                         ("topk(0.1)", lambda c: _topk_plain(c, 0.1))])
@pytest.mark.parametrize("every", [None, 3])
def test_biased_compression_with_error_feedback_equals_the_sequential_simulation(blobs, small_model, name,
                                                                                 plain, every):
    x, y = blobs
    strategy = f"sync(compress={name})" if every is None else f"periodic(every={every}, compress={name})"
    result = fit(small_model, blobs, strategy=strategy, momentum=0.9)
    expected = simulate(small_model, x, y, compress=plain, every=every, momentum=0.9)
    assert max_abs_diff(result.model, expected) <= 1e-5
    uncompressed = fit(small_model, blobs, strategy=strategy.replace(name, "none"), momentum=0.9)
    assert max_abs_diff(result.model, uncompressed.model) > 1e-4  # compression did change something


class OneSidedPowerSGD:
    """powersgd(alternate=true), written out for one replica at a time: odd exchanges project each
    weight matrix M onto the shared Q̂ = orth(mean Q) (d = M·Q̂·Q̂ᵀ), even ones onto
    P̂ = orth(mean P) (d = P̂·P̂ᵀ·M); each exchange's factors are averaged into the next basis."""

    def __init__(self, model, rank):
        self.shapes = [tuple(p.shape) for p in model.parameters()]
        self.ranks = [cx.powersgd_rank(s, rank, 2.0) for s in self.shapes]
        qs = cx.initial_q(self.shapes, rank, 2.0, 0).split(
            [s[1] * r for s, r in zip(self.shapes, self.ranks) if r])
        self.memory = {i: q.reshape(-1, r) for i, q, r in zip(
            [i for i, r in enumerate(self.ranks) if r], qs, [r for r in self.ranks if r])}
        self.exchanges, self.factors = 1, {}

    def __call__(self, c):
        out, offset = [], 0
        for i, (shape, r) in enumerate(zip(self.shapes, self.ranks)):
            piece = c[offset:offset + math.prod(shape)]
            offset += piece.numel()
            if not r:
                out.append(piece)
                continue
            m = piece.reshape(shape)
            basis = cx.gram_schmidt(self.memory[i].clone())
            factor = m @ basis if self.exchanges % 2 else m.T @ basis
            self.factors.setdefault(i, []).append(factor)
            out.append((factor @ basis.T if self.exchanges % 2 else basis @ factor.T).reshape(-1))
        return torch.cat(out)

    def exchanged(self):
        self.memory = {i: sum(fs) / len(fs) for i, fs in self.factors.items()}
        self.exchanges, self.factors = self.exchanges + 1, {}


def test_alternating_powersgd_equals_its_sequential_simulation(blobs, small_model):
    # rank 2: Gram-Schmidt on both sides, as in the simulation (QR differs by column signs only)
    x, y = blobs
    result = fit(small_model, blobs, strategy="sync(compress=powersgd(2, alternate=true))", momentum=0.9)
    expected = simulate(small_model, x, y, compress=OneSidedPowerSGD(small_model, 2), every=None, momentum=0.9)
    assert max_abs_diff(result.model, expected) <= 1e-5
    two_sided = fit(small_model, blobs, strategy="sync(compress=powersgd(2))", momentum=0.9)
    assert max_abs_diff(result.model, two_sided.model) > 1e-4
    # one all-reduce a step: [P (16×2) or Q (8×2) of the first layer, the rest] and the weight;
    # rank 2 leaves the 3×16 layer uncompressed ((3 + 16)·2·2 > 48); 12 steps, 6 on each side
    p_len, q_len, plain = 16 * 2, 8 * 2, 16 + 3 * 16 + 3
    assert [cx.powersgd_rank(s, 2, 2) for s in [(16, 8), (3, 16)]] == [2, 0]
    sides = 6 * (p_len + plain + 1) * 4 + 6 * (q_len + plain + 1) * 4
    assert result.final["comm_bytes"] == 195 * 4 + sides


def test_diloco_compresses_the_pseudo_gradient_with_outer_lr_1_as_periodic(blobs, small_model):
    diloco = fit(small_model, blobs, strategy="diloco(every=3, outer_lr=1, outer_momentum=0, compress=topk(0.1))")
    periodic = fit(small_model, blobs, strategy="periodic(every=3, compress=topk(0.1))")
    assert max_abs_diff(diloco.model, periodic.model) <= 1e-6


# ---- stacked replicas, resume ---------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["sync(compress=fp16)", "sync(compress=powersgd(2))",
                                      "sync(compress=powersgd(2, alternate=true))",
                                      "periodic(every=3, compress=int8(block=32))",
                                      "diloco(every=4, compress=topk(0.2))"])
def test_stacked_replicas_equal_unstacked_ones(blobs, small_model, strategy):
    threads = fit(small_model, blobs, strategy=strategy, momentum=0.9)
    stacked = fit(small_model, blobs, strategy=strategy, momentum=0.9, backend="stacked")
    assert max_abs_diff(threads.model, stacked.model) <= 1e-5
    assert stacked.final["comm_bytes"] == 0  # nothing left the process


def test_stacked_replicas_equal_unstacked_ones_where_powersgd_orthogonalizes_by_batched_qr(blobs):
    """Rank 4 compresses the 64×64 layer: stacked replicas factor a batch [R, n, 4] in one QR call."""
    torch.manual_seed(0)
    model = mlp(8, [64, 64], 3)
    threads = fit(model, blobs, strategy="sync(compress=powersgd(4))", momentum=0.9)
    stacked = fit(model, blobs, strategy="sync(compress=powersgd(4))", momentum=0.9, backend="stacked")
    assert max_abs_diff(threads.model, stacked.model) <= 1e-5
    assert max_abs_diff(threads.model, fit(model, blobs, strategy="sync", momentum=0.9).model) > 1e-3


@pytest.mark.parametrize("strategy", ["sync(compress=powersgd(1, start=3))",
                                      "sync(compress=powersgd(1, start=1, alternate=true))",
                                      "periodic(every=4, compress=int8(32))", "diloco(every=4, compress=topk(0.1))"])
def test_resume_mid_run_with_residuals_is_bit_identical(blobs, small_model, tmp_path, strategy):
    kwargs = dict(strategy=strategy, momentum=0.9, epochs=3)
    everything = tmp_path / "all"
    uninterrupted = fit(small_model, blobs, checkpoint_dir=everything, keep_checkpoints=100, **kwargs)
    steps = sorted(files.steps_on_disk(everything))
    step = steps[len(steps) // 2]
    saved = files.load(everything / files.directory_name(step)).replicas[1]
    assert "strategy/compress.residual" in saved and saved["strategy/compress.residual"].abs().sum() > 0
    resumed = fit(small_model, blobs, checkpoint_dir=interrupted_at(everything, tmp_path / "at", step),
                  resume=True, **kwargs)
    assert max_abs_diff(resumed.model, uninterrupted.model) == 0.0
    same_history(resumed.history, uninterrupted.history)


@pytest.mark.parametrize("name", ["fp16", "int8", "topk(0.1)", "powersgd(1)"])
def test_a_skipped_non_finite_step_leaves_no_nan_in_the_residuals(blobs, name):
    from test_nonfinite import start

    skipped = fit(start(how="nan", rank=0, at=5), blobs, strategy=f"sync(compress={name})", nan="skip", epochs=3)
    assert skipped.history[-1]["discarded_steps"] == 2  # both replicas dropped the shared step 5, no other
    assert all(torch.isfinite(p).all() for p in skipped.model.parameters())


@pytest.mark.parametrize("name", ["powersgd(1)", "powersgd(1, alternate=true)"])
def test_a_non_finite_or_zero_first_exchange_does_not_stall_powersgd(blobs, name):
    """Rank 1 orthogonalizes by Gram-Schmidt, which keeps a zero column zero: a discarded first
    step (no mean P kept yet) or a zero mean must leave the factor memory as it was."""
    from types import SimpleNamespace

    from test_comm import run_ranks
    from test_nonfinite import start
    from unison.strategies.compressed import compressed_mean

    skipped = fit(start(how="nan", rank=0, at=1), blobs, strategy=f"sync(compress={name})", nan="skip", epochs=3)
    clean = fit(start(how="nan", rank=0, at=10**6), blobs, strategy=f"sync(compress={name})", nan="skip", epochs=3)
    assert skipped.history[-1]["discarded_steps"] == 2
    assert skipped.final["train_loss"] < 1.5 * clean.final["train_loss"]  # it kept learning after step 1
    compression = cx.parse(name)
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(5, 2, 6 * 5 + 4 * 5, generator=g)  # [step, rank, P]: a 6×5 and a 4×5 matrix
    no_gradient = vectors.clone()
    no_gradient[0, :, 30:] = 0                                  # step 1: the second layer has no gradient
    counted, nothing_first = [[1.0, 1.0]] * 5, [[0.0, 0.0]] + [[1.0, 1.0]] * 4

    def exchanges(vectors, weights):
        def body(comm):
            trainable = [torch.zeros(6, 5), torch.zeros(4, 5)]
            replica = SimpleNamespace(strategy_state={}, local_shape=(), trainable=trainable)
            return [compressed_mean(replica, comm, vectors[step, comm.rank].clone(), w[comm.rank], compression)
                    for step, w in enumerate(weights)]
        results, errors = run_ranks(2, body)
        assert errors == [None, None]
        return results[0]
    # from step 3 on (alternating: its next P side) each layer's mean is sent again
    for out in exchanges(no_gradient, counted)[2:] + exchanges(vectors, nothing_first)[2:]:
        assert float(out[:30].abs().sum()) > 0 and float(out[30:].abs().sum()) > 0


def test_alternating_powersgd_with_nothing_to_compress_is_plain_sync(blobs, small_model):
    # rank 8 compresses no layer of the small MLP: (16 + 8)·8·2 > 16·8 and (3 + 16)·3·2 > 3·16
    alone = fit(small_model, blobs, strategy="sync(compress=powersgd(8, alternate=true))", epochs=3)
    plain = fit(small_model, blobs, strategy="sync", epochs=3)
    assert max_abs_diff(alone.model, plain.model) <= 1e-6


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_half_precision_mean_stays_the_weighted_mean_as_the_weights_change(name):
    # the weight rides in the payload, pre-scaled by the last exchange's total: steps whose
    # totals differ (a short last batch, a worker with nothing left) must still give the mean
    from types import SimpleNamespace

    from test_comm import run_ranks
    from unison.strategies.compressed import compressed_mean
    compression = cx.parse(name)
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(5, 3, 40, generator=g)              # [step, rank, P]
    weights = [[8, 8, 8], [8, 8, 8], [8, 5, 0], [2, 8, 8], [8, 8, 8]]
    eps = torch.finfo(compression.dtype).eps

    def body(comm):
        replica = SimpleNamespace(strategy_state={})
        for step, w in enumerate(weights):
            out = compressed_mean(replica, comm, vectors[step, comm.rank].clone(), float(w[comm.rank]), compression)
            expected = (vectors[step] * torch.tensor(w, dtype=torch.float32)[:, None]).sum(0) / sum(w)
            assert torch.allclose(out, expected, atol=4 * eps * vectors[step].abs().max()), (step, w)
        return replica.strategy_state
    results, errors = run_ranks(3, body)
    assert errors == [None, None, None]
    assert all(float(r["compress.total"].squeeze()) == 24.0 for r in results)  # the last total


def test_a_residual_row_that_is_not_finite_keeps_the_old_one_or_zeros():
    from unison.strategies.compressed import _finite_or

    new = torch.tensor([[1.0, 2.0], [float("nan"), 1.0], [3e38, 3e38]])  # the last row's sum overflows
    old = torch.full((3, 2), 7.0)
    assert torch.equal(_finite_or(new, old), torch.tensor([[1.0, 2.0], [7.0, 7.0], [7.0, 7.0]]))
    assert torch.equal(_finite_or(new, None), torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(_finite_or(new[:1], old[:1]), new[:1])
