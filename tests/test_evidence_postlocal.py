"""The postlocal experiment's measure: its arms, and the final models it reads back to measure
train accuracy (unison.evidence.postlocal)."""

from __future__ import annotations

import pytest

from unison.data import prepare
from unison.evidence import postlocal
from unison.evidence.base import Context, final, per_seed
from unison.strategies import parse


def test_post_local_sgd_turns_local_at_the_lr_drop_with_the_large_batch_lr():
    runs = postlocal.arms(20)
    post, large = runs[postlocal.POST], runs[postlocal.LARGE]
    assert post["lr"] == large["lr"] == postlocal.LR * postlocal.WORKERS and post["schedule"] == large["schedule"]
    strategy = parse(post["strategy"])
    steps_per_epoch = -(-(postlocal.TRAIN_SAMPLES // postlocal.WORKERS) // postlocal.BATCH)
    assert strategy.warmup == 10 * steps_per_epoch and "every=10" in large["schedule"]  # the drop, half-way
    assert strategy.in_warmup(strategy.warmup) and not strategy.in_warmup(strategy.warmup + 1)


@pytest.mark.slow
def test_the_final_models_read_back_are_the_ones_validated(tmp_path, monkeypatch):
    """A seed's model file, on the split of compare's first seed, gives the val_acc its last
    record has: so train accuracy is measured on that seed's training split with its model."""
    monkeypatch.setattr(postlocal, "DATA", "synthetic(samples=400)")
    context = Context(seeds=[3, 4], quick=True, out=tmp_path, progress=False)
    loaded = context.compare("tiny", {"sync": {"strategy": "sync"}}, data=postlocal.DATA, workers=4, epochs=2,
                             batch_size=16, lr=0.1)
    data = prepare(postlocal.DATA, seed=3)
    models = postlocal.final_models(loaded, tmp_path / "tiny", "sync", data)
    recorded = per_seed(loaded, "sync", final())
    assert [postlocal.accuracy(m, data.x_val, data.y_val) for m in models] == pytest.approx(recorded, abs=1e-6)
    assert postlocal.train_accuracy(loaded, tmp_path / "tiny", "sync", 3) == \
        pytest.approx([postlocal.accuracy(m, data.x, data.y) for m in models])
