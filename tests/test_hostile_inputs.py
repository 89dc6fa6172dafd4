"""Inputs a hostile-input battery found mishandled, one section each; every result is held
to a plain reference computation, not to numbers written down by hand."""

import numpy as np
import pytest
import torch

from unison import datafiles, merges
from unison.errors import ConfigError, DataError
from unison.partitions import Explicit

# ---- krum: near-equal replicas (torch.cdist's |a|² + |b|² − 2ab cancels above 25 rows) ----

def krum_scores_reference(states, f):
    """Krum's score by its definition, a plain loop in float64: the sum of the squared
    distances to the n − f − 2 nearest other states."""
    x = [np.asarray(s, dtype=np.float64) for s in states]
    n = len(x)
    scores = []
    for i in range(n):
        nearest = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(nearest[:n - f - 2]))
    return scores


def near_equal_states(n, close, far, seed=0):
    """A common vector of values ~1e3 plus perturbations ~1e-6 (replicas just after a merge);
    the ``close`` states are clearly nearest the others, the ``far`` ones clearly farthest."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(500, 1500, 200)
    noise = rng.normal(size=(n, 200)) * 1e-6
    noise[list(close)] *= 0.3
    noise[list(far)] *= 3
    return [torch.tensor(base + row) for row in noise]


@pytest.mark.parametrize("n, f", [(26, 1), (30, 2), (40, 5)])
def test_krum_picks_the_reference_winner_among_near_equal_replicas(n, f):
    close = n // 3
    states = near_equal_states(n, close=[close], far=range(n - f, n))
    reference = krum_scores_reference(states, f)
    want = int(np.argmin(reference))
    assert want == close  # the data are as planted, so the reference has a clear winner
    picked = merges.krum(states, f)
    assert [i for i, state in enumerate(states) if torch.equal(state, picked)] == [want]
    np.testing.assert_allclose(merges.krum_scores(states, f).numpy(), reference, rtol=1e-9)


@pytest.mark.parametrize("m", [3, None])
def test_multi_krum_averages_the_reference_choice_among_near_equal_replicas(m):
    n, f = 30, 2
    states = near_equal_states(n, close=[4, 11, 23], far=[7, 19], seed=1)
    reference = krum_scores_reference(states, f)
    chosen = sorted(range(n), key=lambda i: (reference[i], i))[:n - f if m is None else m]
    want = torch.stack([states[i] for i in chosen]).mean(dim=0)
    # a wrong choice moves the mean by ~1e-7 on values ~1e3: compare far tighter than that
    torch.testing.assert_close(merges.multi_krum(states, f, m), want, rtol=0, atol=1e-10)


# ---- median: float32 values near the largest float ----

@pytest.mark.parametrize("values", [
    [3e38, 3.1e38, 3.2e38],
    [3e38, 3.1e38, 3.2e38, 3.3e38],
    [-3.3e38, -3.2e38, -3.1e38, -3e38],
    [-3.3e38, 3.3e38, -3.2e38, 3.2e38],   # middles of opposite signs: their difference overflows
])
def test_median_of_float32_values_near_the_largest_float_is_finite(values):
    states = [torch.tensor([v], dtype=torch.float32) for v in values]
    want = np.median(np.array(values, dtype=np.float32).astype(np.float64))
    got = merges.median(states)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert torch.equal(got, torch.tensor([want], dtype=torch.float32))


@pytest.mark.parametrize("n", [3, 4, 7, 8])
def test_median_of_mixed_coordinates_is_numpys_in_float64_cast_back(n):
    rng = np.random.default_rng(n)
    columns = [rng.uniform(3e38, 3.4e38, n), -rng.uniform(3e38, 3.4e38, n),   # sums overflow
               rng.uniform(-3.4e38, 3.4e38, n), rng.normal(size=n),           # ordinary
               rng.uniform(0, 1e-40, n)]                                      # subnormal
    values = np.stack(columns, axis=1).astype(np.float32)
    got = merges.median([torch.from_numpy(row) for row in values])
    want = torch.from_numpy(np.median(values.astype(np.float64), axis=0).astype(np.float32))
    assert torch.equal(got, want)


def test_median_of_ordinary_floats_is_still_the_plain_mean_of_the_middles():
    torch.manual_seed(0)
    states = list(torch.randn(6, 100))
    ordered = torch.stack(states).sort(dim=0).values
    assert torch.equal(merges.median(states), (ordered[2] + ordered[3]) / 2)
    assert torch.equal(merges.median(states[:5]), torch.stack(states[:5]).sort(dim=0).values[2])


# ---- partitions.Explicit: indices that are not integers ----

@pytest.mark.parametrize("shares", [
    [[0.0, 1.7], [2.0]],                       # as_tensor(..., int64) truncated 1.7 to 1
    [[0, 1], [2.0]],                           # integer-valued floats are refused too
    [np.array([0.0, 1.0]), np.array([2])],
    [torch.tensor([0, 1]), torch.tensor([2.0])],
    [[True, False], [1]],                      # a mask, not indices
    [np.array([True, False]), [1]],
    [torch.tensor([True, False]), [1]],
])
def test_explicit_refuses_indices_that_are_not_integers(shares):
    with pytest.raises(ConfigError, match=r"partition=.*explicit.*expected integer sample indices"):
        Explicit(shares)


@pytest.mark.parametrize("shares", [
    [[0, 1, 2], [3, 4]],
    [range(0, 3), range(3, 5)],
    [np.array([0, 1, 2], dtype=np.int32), np.array([3, 4], dtype=np.uint8)],
    [torch.tensor([0, 1, 2]), torch.tensor([3, 4], dtype=torch.int16)],
    [[np.int64(0), np.int64(1), 2], [torch.tensor(3), 4]],
])
def test_explicit_keeps_integer_indices_of_every_kind(shares):
    part = Explicit(shares)
    part.check(5, 2)
    for rank, share in enumerate(shares):
        mine = part.indices(5, 2, rank, epoch=0, seed=0)
        assert mine.dtype == torch.int64
        assert sorted(mine.tolist()) == sorted(int(i) for i in share)


# ---- datafiles: CSV files with a UTF-8 byte-order mark ----

BOM = "\ufeff".encode("utf-8")


def test_csv_with_a_byte_order_mark_reads_like_the_same_file_without(tmp_path):
    text = "a,b,label\n" + "".join(f"{i},{i / 4},{i % 2}\n" for i in range(12))
    plain, marked = tmp_path / "plain.csv", tmp_path / "marked.csv"
    plain.write_bytes(text.encode("utf-8"))
    marked.write_bytes(BOM + text.encode("utf-8"))
    for label in ("a", "b", None):  # "a", the first column, was "\ufeffa" and not found
        x, y = datafiles.read(marked, label=label)
        x_plain, y_plain = datafiles.read(plain, label=label)
        assert torch.equal(x, x_plain) and torch.equal(y, y_plain)


def test_csv_with_a_byte_order_mark_names_its_first_column_plainly(tmp_path):
    text = "a,label\nnot a number,0\n"
    plain, marked = tmp_path / "plain.csv", tmp_path / "marked.csv"
    plain.write_bytes(text.encode("utf-8"))
    marked.write_bytes(BOM + text.encode("utf-8"))
    messages = []
    for path in (plain, marked):
        with pytest.raises(DataError) as caught:
            datafiles.read(path)
        messages.append(str(caught.value).replace(str(path), "FILE"))
    assert messages[1] == messages[0] and "column 'a'" in messages[0]
