"""The comparison's numbers, checked against values computed by hand from made-up histories."""

import csv
import io

import pytest

from unison import summary


def records(walls, metric_values, metric="val_acc", startup=0.5, samples_per_round=100, rate=True):
    out = []
    for i, (wall, value) in enumerate(zip(walls, metric_values), start=1):
        record = {"epoch": float(i), "step": 10 * i, "wall_s": wall, "samples": samples_per_round * i,
                  "train_loss": 1.0 / i, "val_loss": 1.0 / i, metric: value, "divergence": 0.1,
                  "comm_bytes": 1000 * i, "startup_s": startup}
        if rate:
            record["samples_per_s"] = record["samples"] / (wall - startup)
        out.append(record)
    return out


HISTORIES = {
    "single": records([1.0, 2.0, 3.0, 4.0], [0.5, 0.8, 0.9, 0.85], rate=False),
    "periodic": records([1.5, 2.0, 2.5], [0.7, 0.89, 0.95], startup=1.0),
    "oneshot": records([5.0], [0.6], startup=2.0),
}


def test_default_target_time_to_target_and_speedup_by_hand():
    s = summary.summarise(HISTORIES, workers={"single": 1, "periodic": 2, "oneshot": 2})
    assert s.metric == "val_acc" and s.reference == "single"
    assert s.target == pytest.approx(0.98 * 0.9)          # 98% of single's best, 0.882
    single, periodic, oneshot = s.rows
    assert single.time_to_target_s == 3.0                 # 0.8 < 0.882 <= 0.9
    assert periodic.time_to_target_s == 2.0               # 0.89 >= 0.882
    assert oneshot.time_to_target_s is None and oneshot.speedup is None
    assert single.speedup == 1.0 and periodic.speedup == pytest.approx(3.0 / 2.0)
    assert (single.final, single.best, periodic.best) == (0.85, 0.9, 0.95)
    assert single.samples_per_s == pytest.approx(400 / (4.0 - 0.5))   # computed: no samples_per_s field
    assert periodic.samples_per_s == pytest.approx(300 / (2.5 - 1.0))
    assert (periodic.rounds, periodic.comm_bytes, periodic.startup_s, periodic.wall_s) == (3, 3000, 1.0, 2.5)


def test_a_given_target_is_reached_when_met_exactly_and_speedups_follow_it():
    s = summary.summarise(HISTORIES, target=0.89)
    single, periodic, _ = s.rows
    assert s.target_note == "given"
    assert single.time_to_target_s == 3.0 and periodic.time_to_target_s == 2.0
    s = summary.summarise(HISTORIES, target=0.95)
    single, periodic, _ = s.rows
    assert single.time_to_target_s is None and periodic.time_to_target_s == 2.5
    assert periodic.speedup is None  # the reference never got there
    assert "single did not reach it" in summary.verdict(s)


def test_reference_defaults_to_the_first_run_without_single():
    s = summary.summarise({k: HISTORIES[k] for k in ("periodic", "oneshot")})
    assert s.reference == "periodic" and s.target == pytest.approx(0.98 * 0.95)
    assert s.rows[0].time_to_target_s == 2.5


def test_regression_uses_validation_loss_lower_is_better():
    histories = {"single": records([1.0, 2.0], [0.5, 0.1], metric="val_mse"),
                 "sync": records([1.0, 3.0], [0.102, 0.09], metric="val_mse")}
    for h in histories.values():
        for r in h:
            r["val_loss"] = r.pop("val_mse")
    s = summary.summarise(histories)
    assert s.metric == "val_loss" and s.target == pytest.approx(0.1 * 1.02)
    single, sync = s.rows
    assert single.time_to_target_s == 2.0 and sync.time_to_target_s == 1.0   # 0.102 <= 0.102
    assert sync.speedup == pytest.approx(2.0) and sync.best == 0.09


def test_markdown_csv_and_verdict():
    s = summary.summarise(HISTORIES, workers={"single": 1, "periodic": 2, "oneshot": 2})
    table = summary.markdown(s)
    assert "| periodic | 2 | 3 | 95.00% | 95.00% | 2.00 | 1.50× | 200 | 0.00 | 1.00 | 2.50 |" in table
    assert "| oneshot | 2 | 1 | 60.00% | 60.00% | not reached | — |" in table
    assert "time to 88.20% (s)" in table and "98% of single's best" in table
    verdict = summary.verdict(s)
    assert verdict.startswith("**periodic** reached the target first, after 2.00 s: 1.50× the speed of single (3.00 s).")
    assert "Best final validation accuracy: periodic, 95.00%." in verdict
    assert "Not reached by: oneshot." in verdict
    assert "Start-up was over half the time to target for periodic (1.00 s of 2.00 s)" not in verdict  # exactly half
    rows = list(csv.DictReader(io.StringIO(summary.csv_text(s))))
    assert [r["strategy"] for r in rows] == ["single", "periodic", "oneshot"]
    assert float(rows[1]["speedup"]) == 1.5 and float(rows[0]["time_to_target_s"]) == 3.0
    assert rows[2]["time_to_target_s"] == "" and rows[2]["speedup"] == ""
    assert float(rows[0]["target"]) == pytest.approx(0.882)


def test_runner_up_and_start_up_sentences():
    histories = dict(HISTORIES, sync=records([1.9, 2.2], [0.8, 0.9], startup=1.8))
    verdict = summary.verdict(summary.summarise(histories))
    assert "1.50× the speed of single (3.00 s), 1.10× the speed of the runner-up sync (2.20 s)." in verdict
    assert "Start-up was over half the time to target for sync (1.80 s of 2.20 s)." in verdict
    tied = dict(HISTORIES, sync=records([1.9, 2.2], [0.8, 0.95]))
    assert "Best final validation accuracy: periodic, sync, 95.00%." in summary.verdict(summary.summarise(tied))
    same = {"a": records([1.0], [0.9]), "b": records([2.0], [0.9])}
    assert "Every run ended at 90.00% validation accuracy." in summary.verdict(summary.summarise(same))
    nobody = summary.verdict(summary.summarise(HISTORIES, target=0.99))
    assert nobody.startswith("No strategy reached the target (99.00%).")
