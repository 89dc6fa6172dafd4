"""The diloco experiment's measure: its effects computed from the arms and records as
documented (a fake comparison stands in for training)."""

from __future__ import annotations

import pytest

from unison import report
from unison.evidence import diloco
from unison.evidence.base import Context

LOSS = {"single": 0.30, "outer SGD (periodic)": 0.25, "outer Adam": 0.15, "Nesterov H=8": 0.08,
        "Nesterov H=24": 0.10, "Nesterov H=96": 0.14, f"Nesterov H=24 {diloco.SKEW}": 0.2}


def history(name: str, seed: int, epochs: int) -> list[dict]:
    """Four records a run; the non-IID run's accuracy starts far lower and catches up."""
    skewed = diloco.SKEW in name
    return [{"epoch": e, "step": 12 * e, "val_loss": LOSS[name] + 0.01 * seed + (epochs - e) / epochs,
             "val_acc": 0.95 - (0.3 if skewed else 0.1) * (epochs - e) / epochs + 0.01 * seed}
            for e in (epochs // 8, epochs // 4, epochs // 2, epochs)]


class FakeContext(Context):
    def compare(self, part, strategies, **settings):
        assert settings["optimizer"] == "adamw" and settings["workers"] == diloco.WORKERS
        return report.Loaded(histories={}, attempts={
            name: [(seed, history(name, seed, settings["epochs"])) for seed in self.seeds] for name in strategies})


def test_effects_are_computed_from_the_arms_as_documented(tmp_path):
    nesterov, adam, grows, gently, skew = diloco.measure(FakeContext(seeds=[0, 1, 2], quick=True, out=tmp_path))
    for seed in range(3):
        main = nesterov.arms["Nesterov H=24"][seed]
        assert nesterov.effects[seed] == pytest.approx(nesterov.arms["outer SGD (periodic)"][seed] - main)
        assert adam.effects[seed] == pytest.approx(adam.arms["outer Adam"][seed] - main)
        assert grows.effects[seed] == pytest.approx(min(0.10 - 0.08, 0.14 - 0.10))
        assert gently.effects[seed] == pytest.approx((0.30 - 0.14) / (0.30 - 0.08) - diloco.KEPT)
    epochs = diloco.epochs(True)
    early = [r for r in history("Nesterov H=24", 0, epochs) if r["epoch"] >= epochs / 4][0]
    skewed_early = [r for r in history(f"Nesterov H=24 {diloco.SKEW}", 0, epochs) if r["epoch"] >= epochs / 4][0]
    assert skew.arms["at 25% of the run"][0] == pytest.approx(early["val_acc"] - skewed_early["val_acc"])
    assert skew.arms["at the end"][0] == pytest.approx(0.0)
    assert skew.effects[0] == pytest.approx(skew.arms["at 25% of the run"][0]) and skew.effects[0] > 0


def test_kept_gain_is_zero_without_a_gain():
    assert diloco.kept_gain([0.3, 0.1], [0.1, 0.2], [0.2, 0.3]) == [pytest.approx(0.5), 0.0]
