import numpy as np
import pytest
import torch

from unison.data import prepare
from unison.errors import DataError


def test_builtin_split_is_stratified_reproducible_and_standardised_on_train_only():
    a, b = prepare("digits", seed=3), prepare("digits", seed=3)
    assert torch.equal(a.x_val, b.x_val) and len(a.x_val) == round(0.2 * 1797)
    assert not torch.equal(prepare("digits", seed=4).y_val, a.y_val)
    assert torch.allclose(a.x.mean(0), torch.zeros(64), atol=1e-5)
    # class shares are kept within one sample
    for label in range(10):
        share = int((a.y_val == label).sum()) / int(((a.y == label).sum() + (a.y_val == label).sum()))
        assert abs(share - 0.2) < 0.03
    # a pixel that is always 0 in training keeps scale 1: validation values stay finite and small
    assert a.x_val.abs().max() < 100


@pytest.mark.parametrize("classes, per_class", [(100, 2), (12, 3), (3, 40)])
def test_holdout_takes_the_asked_fraction_even_with_tiny_classes(classes, per_class):
    y = torch.arange(classes * per_class) % classes
    x = torch.randn(len(y), 2)
    data = prepare((x, y), val=0.2)
    assert len(data.x_val) == round(0.2 * len(y))
    assert len(data.x) + len(data.x_val) == len(y)


@pytest.mark.parametrize("val", [0, 0.0, None])
def test_val_zero_or_none_means_no_validation(val):
    data = prepare((torch.randn(10, 2), torch.arange(10) % 2), val=val)
    assert data.x_val is None and len(data.x) == 10


def test_val_fraction_out_of_range():
    with pytest.raises(DataError, match="fraction in"):
        prepare((torch.randn(10, 2), torch.arange(10) % 2), val=1)


def test_dataset_of_pairs_numpy_and_regression_targets():
    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return np.full(3, i, dtype=np.float32), float(i) / 2

    data = prepare(Pairs())
    assert data.task == "regression" and data.x.shape == (6, 3) and data.y.dtype == torch.float32
    assert data.outputs == 1 and torch.equal(data.y, torch.arange(6) / 2)
    two = prepare((np.zeros((5, 2)), np.zeros((5, 2))))
    assert two.outputs == 2 and two.x.dtype == torch.float32


def test_integer_targets_are_classes():
    data = prepare((np.zeros((4, 2)), np.array([0, 2, 1, 2])))
    assert data.task == "classification" and data.num_classes == 3 and data.y.dtype == torch.int64


@pytest.mark.parametrize("shape", [(50, 3), (40, 2, 3, 2)])
def test_first_nonfinite_row_matches_numpy_across_chunks_without_overflowing(shape):
    from unison.data import first_nonfinite_row

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(*shape, generator=generator) * 3e38  # finite, but sums of them overflow
    assert first_nonfinite_row(x, chunk_elements=7) is None
    for row, value in [(0, float("nan")), (13, float("inf")), (len(x) - 1, float("-inf"))]:
        bad = x.clone()
        bad[row].view(-1)[-1] = value
        bad[-1].view(-1)[0] = float("nan")  # a later bad row never hides the first
        expected = int(np.flatnonzero(~np.isfinite(bad.numpy().reshape(len(bad), -1)).all(axis=1))[0])
        assert first_nonfinite_row(bad, chunk_elements=7) == expected == row
    assert first_nonfinite_row(torch.arange(10).reshape(5, 2)) is None  # integers are always finite
