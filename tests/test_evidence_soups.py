"""unison reproduce soups: the soups and the findings are computed as documented."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from unison.evidence import soups
from unison.evidence.base import Context

ALWAYS_0 = torch.tensor([0.0, 0.0, 1.0, 0.0])   # nn.Linear(1, 2): weights 0, bias favours class 0
ALWAYS_1 = torch.tensor([0.0, 0.0, 0.0, 1.0])


def _splits() -> soups.Splits:
    x = lambda n: torch.zeros(n, 1)  # noqa: E731 - the bias alone decides
    return soups.Splits(train=(x(1), torch.tensor([0])), select=(x(3), torch.tensor([0, 0, 1])),
                        test=(x(4), torch.tensor([1, 1, 0, 1])))


def test_the_best_single_model_is_picked_on_the_selection_split_and_scored_on_the_test_split():
    result = soups.soups(nn.Linear(1, 2), [ALWAYS_0, ALWAYS_1], _splits())
    assert result.ingredients == [0.25, 0.75]
    assert result.best_single == 0.25          # ALWAYS_0 is best on selection (2/3), not on test
    assert result.uniform == 0.25              # the mean's logits tie: argmax picks class 0
    assert result.greedy_size == 2 and result.greedy == 0.25  # adding ALWAYS_1 kept the selection score


def test_the_effects_are_the_documented_differences(monkeypatch):
    shared = soups.Soups(ingredients=[0.9, 0.8], best_single=0.9, uniform=0.85, greedy=0.92, greedy_size=2)
    apart = soups.Soups(ingredients=[0.9, 0.7], best_single=0.9, uniform=0.3, greedy=0.9, greedy_size=1)
    monkeypatch.setattr(soups, "one_seed", lambda context, seed, epochs: (shared, apart))
    found = soups.measure(Context(seeds=[0, 1, 2], quick=True, out=None, progress=False))
    assert [f.effects for f in found] == [pytest.approx([0.02] * 3), pytest.approx([0.07] * 3),
                                          pytest.approx([0.5] * 3)]
    assert found[2].threshold == soups.COLLAPSE_POINTS and found[2].arms["uniform soup (one start)"] == [0.85] * 3


def test_the_sweep_is_a_comparison_whose_saved_models_are_the_ingredients(tmp_path):
    """From one start, each saved model is that run's fine-tuned weights (a run with lr 0 would
    have kept the start; runs with different lrs differ)."""
    data = soups.splits(0)
    torch.manual_seed(0)
    start = soups.network()
    context = Context(seeds=[0, 1], quick=True, out=tmp_path, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the report's plots of 8 runs fit (a long legend note once did not)
        states = soups.fine_tuned(context, start, data, epochs=1, seed=1)
    assert len(states) == len(soups.SWEEP) and (tmp_path / "sweep-seed1" / "report.html").is_file()
    flat = torch.nn.utils.parameters_to_vector(start.parameters()).detach()
    assert all(not torch.equal(state, flat) for state in states)  # fine-tuned, not the start
    assert not torch.allclose(states[0], states[-1])               # lr 0.01 vs 0.3: different models
    reference = soups.fit(soups.copy.deepcopy(start), data.train, data.select, strategy="single", backend="stacked",
                          workers=1, epochs=1, batch_size=soups.BATCH, lr=soups.SWEEP[0][0], momentum=0.9,
                          weight_decay=soups.SWEEP[0][1], seed=1, progress=False).model
    assert torch.allclose(states[0], torch.nn.utils.parameters_to_vector(reference.parameters()), atol=1e-6)
