"""unison reproduce hogwild: the model's sparse updates and the findings' effects."""

from __future__ import annotations

import pytest
import torch

from unison.evidence import hogwild
from unison.evidence.base import Context


def test_a_sparse_step_touches_only_the_rows_of_its_batch_and_a_dense_one_all():
    (x, y), _ = hogwild.sparse_problem(0)
    batch = x[:4]
    for model, sparse in ((hogwild.BagOfFeatures(), True), (hogwild.DenseBagOfFeatures(), False)):
        torch.nn.functional.cross_entropy(model(batch), y[:4]).backward()
        grad = model.weights.weight.grad
        assert grad.is_sparse == sparse
        touched = set(grad.coalesce().indices()[0].tolist()) if sparse else set(range(hogwild.FEATURES))
        assert touched >= set(batch.long().flatten().tolist())
        assert len(touched) == (len(set(batch.long().flatten().tolist())) if sparse else hogwild.FEATURES)


def test_the_labels_follow_a_hidden_linear_rule_with_both_classes():
    (x, y), (x_val, y_val) = hogwild.sparse_problem(3)
    assert x.shape == (hogwild.SAMPLES, hogwild.NONZEROS) and len(x_val) == hogwild.VAL
    assert 0.3 < float(y.float().mean()) < 0.7 and torch.equal(hogwild.sparse_problem(3)[0][1], y)


def test_the_effects_are_speed_ups_over_one_worker(monkeypatch):
    rates = {"sparse": {"hogwild ×1": [100.0] * 3, "hogwild ×2": [180.0] * 3, "hogwild ×4": [190.0] * 3},
             "dense": {"hogwild ×1": [100.0] * 3, "hogwild ×2": [120.0] * 3, "hogwild ×4": [110.0] * 3,
                       "sync ×2": [60.0] * 3}}
    accuracy = {label: [0.8] * 3 for label in rates["sparse"]} | {"hogwild ×2": [0.78, 0.8, 0.795]}
    monkeypatch.setattr(hogwild, "speedups", lambda context, part, *args, **kw: (rates[part], accuracy))
    found = hogwild.measure(Context(seeds=[0, 1, 2], quick=True, out=None, progress=False))
    assert found[0].effects == pytest.approx([1.8] * 3) and found[0].threshold == hogwild.SPEEDUP
    assert found[1].effects == pytest.approx([0.6] * 3)
    assert found[2].effects == pytest.approx([2.0] * 3) and found[2].threshold == 1.0
    assert found[3].effects == pytest.approx([-0.02, 0.0, -0.005]) and found[3].threshold == -hogwild.ACCURACY_COST
    assert hogwild.throughput([{"samples_per_s": 5.0}, {"samples_per_s": 7.0}]) == 7.0
