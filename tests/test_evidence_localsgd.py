"""The localsgd experiment's measure: its speed-ups, merges and effects, computed from the
records as documented (a fake comparison stands in for training)."""

from __future__ import annotations

import math

import pytest

from unison import report
from unison.evidence import localsgd
from unison.evidence.base import Context

BASELINE_STEPS = 512


def history(workers: int, every: int, seed: int) -> list[dict]:
    """Records at every merge; the loss falls with the samples seen, slower for large H."""
    steps = BASELINE_STEPS // workers
    slowdown = 3.0 if every == localsgd.LARGE_H else 1.0 + 0.01 * every
    rate = workers / slowdown * (1.0 + 0.05 * seed)
    return [{"step": s, "epoch": s / steps, "val_loss": 1.0 / (1.0 + 0.02 * rate * s),
             "collectives": {"all_reduce": [1, 100]} if workers > 1 else {}}
            for s in list(range(every, steps + 1, every)) + ([steps] if steps % every else [])]


class FakeContext(Context):
    def compare(self, part, strategies, **settings):
        runs = {name: (options["workers"], int(options["strategy"].split("=")[1].rstrip(")")))
                for name, options in strategies.items()}
        return report.Loaded(histories={}, attempts={
            name: [(seed, history(n, h, seed)) for seed in self.seeds] for name, (n, h) in runs.items()})


@pytest.mark.parametrize("quick", [True, False])
def test_effects_are_computed_from_the_arms_as_documented(tmp_path, quick):
    near_linear, merges, degrade = localsgd.measure(FakeContext(seeds=[0, 1, 2], quick=quick, out=tmp_path))
    workers, everies = localsgd.grid(quick)
    top = max(workers)
    for seed in range(3):
        fractions = [values[seed] / int(name.split()[0][2:]) for name, values in near_linear.arms.items()]
        assert near_linear.effects[seed] == pytest.approx(min(fractions) - localsgd.HALF_LINEAR)
        assert degrade.effects[seed] == pytest.approx(degrade.arms[localsgd.label(top, 1)][seed]
                                                      - degrade.arms[localsgd.label(top, localsgd.LARGE_H)][seed])
    assert set(near_linear.arms) == {localsgd.label(n, h) for n in workers for h in everies if h in localsgd.SMALL_H}
    steps = BASELINE_STEPS // top
    assert merges.arms[localsgd.label(top, 1)] == [steps] * 3          # one record (merge) per step
    assert merges.arms[localsgd.label(top, 64)] == [math.ceil(steps / 64)] * 3
    assert merges.effects == [pytest.approx(min(steps / math.ceil(steps / h) / h for h in everies if h > 1))] * 3
    assert degrade.effects[0] > 0 and near_linear.effects[0] > 0


def test_the_target_is_the_baselines_loss_halfway_and_a_miss_gets_a_bound():
    baseline = [history(1, 1, seed) for seed in range(3)]
    assert localsgd.target_loss(baseline) == pytest.approx(baseline[1][BASELINE_STEPS // 2 - 1]["val_loss"])
    # reached at step 32, missed with 64 steps run: 256 / 32 and at most 256 / 64
    assert localsgd.speedups([256.0, 256.0], [32.0, math.nan], [64.0, 64.0]) == [8.0, 4.0]
    assert localsgd.merges([{"collectives": {"all_reduce": [2, 8], "broadcast": [1, 8]}}, {}]) == 3.0
