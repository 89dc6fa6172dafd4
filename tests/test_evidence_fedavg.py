"""The fedavg experiment's measure: rounds read from records, the lr and arm picked, and the
two effects computed from the arms as documented (unison.evidence.fedavg)."""

from __future__ import annotations

import math

import pytest

from unison.evidence import fedavg
from unison.evidence.base import Context, per_seed

NAN = math.nan


def test_rounds_are_steps_over_the_steps_per_round():
    records = [{"step": 15, "val_acc": 0.5}, {"step": 30, "val_acc": 0.96}, {"step": 45, "val_acc": 0.97}]
    assert fedavg.rounds_to(0.95, 15)(records) == 2
    assert math.isnan(fedavg.rounds_to(0.99, 15)(records))
    assert fedavg.steps_per_round(5, 10) == 5 * 15 and fedavg.steps_per_round(1, 50) == 3


def test_the_best_lr_and_the_fastest_arm_go_by_median_rounds_and_misses_lose():
    assert fedavg.best_lr({0.1: [4.0, 5.0, 6.0], 0.3: [2.0, 9.0, 3.0], 1.0: [1.0, NAN, NAN]}) == 0.3
    assert fedavg.best_lr({0.1: [2.0, 2.0], 0.3: [2.0, 2.0]}) == 0.1
    arms = {fedavg.FEDSGD: [1.0, 1.0], "a": [3.0, 4.0], "b": [2.0, 4.0], "c": [1.0, NAN]}
    assert fedavg.fastest(arms) == "b"  # FedSGD is never the FedAvg arm, a miss loses to any reach
    assert fedavg.fastest({"a": [1.0, 2.0, 2.0, 1.0, 1.0], "b": [1.0, 2.0, 1.0, 1.0, 1.0]}) == "b"  # equal medians


def test_speedups_and_the_drop_follow_the_documented_bounds():
    sgd, avg = [20.0, NAN, 30.0], [2.0, 4.0, NAN]
    assert fedavg.speedups(sgd, avg, 60, censor_fedsgd=True)[:2] == [10.0, 15.0]  # a FedSGD miss: its budget
    assert math.isnan(fedavg.speedups(sgd, avg, 60, censor_fedsgd=True)[2])       # a FedAvg miss: nan
    assert math.isnan(fedavg.speedups(sgd, avg, 60, censor_fedsgd=False)[1])
    drop = fedavg.gain_drop([10.0, 10.0, NAN], [20.0, NAN, 20.0], [5.0, 5.0, 5.0], rounds=15)
    assert drop[0] == pytest.approx(math.log(10.0) - math.log(4.0))
    assert math.isnan(drop[1]) and math.isnan(drop[2])
    censored = fedavg.gain_drop([10.0], [20.0], [NAN], rounds=15)  # a non-IID FedAvg miss counts as the budget
    assert censored[0] == pytest.approx(math.log(10.0) - math.log(20.0 / 15))


@pytest.mark.slow
def test_each_fedavg_record_is_one_merge_and_fedsgd_one_step_a_round(tmp_path):
    """What rounds_to divides by: sync with a batch above the share steps once an epoch (and
    records each), periodic(every=E·⌈share/B⌉) records once per merge."""
    runs = fedavg.arms(rounds=2, fedsgd_rounds=3)
    picked = {label: runs[label] for label in (fedavg.FEDSGD, fedavg.fedavg_label(5, 50))}
    context = Context(seeds=[0], quick=True, out=tmp_path, progress=False)
    loaded = context.compare("iid", {label: options for label, (options, _) in picked.items()},
                             workers=fedavg.WORKERS, momentum=0.0, lr=0.3)
    for label, (_, per_round) in picked.items():
        steps = per_seed(loaded, label, lambda records: [record["step"] for record in records])[0]
        expected = 3 if label == fedavg.FEDSGD else 2
        assert steps == [per_round * (k + 1) for k in range(expected)], label
