"""The localsgd experiment's measure: its speed-ups, merges and effects, computed from the
records as documented (a fake comparison stands in for training)."""

from __future__ import annotations

import math

import pytest

from unison import report
from unison.evidence import localsgd
from unison.evidence.base import Context

BASELINE_STEPS = 4096  # 16 workers: 256 steps, four H=64 records


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
        # H=1's reach read on H=64's record steps (a reference computation from the fake records)
        target = localsgd.target_loss([history(1, 1, k) for k in range(3)])
        reach = next(r["step"] for r in history(top, 1, seed) if r["val_loss"] <= target)
        grid = [r["step"] for r in history(top, localsgd.LARGE_H, seed)]
        one = next(r["step"] for r in history(1, 1, seed) if r["val_loss"] <= target)
        synced = one / next(g for g in grid if g >= reach)
        coarse = degrade.arms[localsgd.label(top, localsgd.LARGE_H)][seed]
        assert degrade.effects[seed] == pytest.approx(synced - coarse)
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


def test_a_reach_between_two_coarse_records_is_read_at_the_next_one():
    assert localsgd.on_grid(65.0, [64.0, 128.0, 192.0]) == 128.0
    assert localsgd.on_grid(64.0, [64.0, 128.0]) == 64.0
    assert localsgd.on_grid(200.0, [64.0, 128.0, 192.0]) == 200.0   # past the last record: as it was
    assert math.isnan(localsgd.on_grid(math.nan, [64.0]))
