"""The honest verdict on made-up histories: a winner only when its lead holds across repeats,
implausible speedups, diverging runs and a noisy machine named; the statistics by hand."""

import math

import pytest

from unison import measure, summary, verdict


def records(walls, accs, losses=None, startup=0.1):
    losses = losses or [1.0 / (i + 1) for i in range(len(walls))]
    return [{"epoch": float(i + 1), "step": i + 1, "wall_s": wall, "samples": 100 * (i + 1), "train_loss": loss,
             "val_loss": loss, "val_acc": acc, "divergence": 0.0, "comm_bytes": 0, "startup_s": startup}
            for i, (wall, acc, loss) in enumerate(zip(walls, accs, losses))]


def attempts(times, acc=0.9, seed_accs=None):
    """One attempt per time: the run reaches ``acc`` at that wall time (round 2 of 2)."""
    out = []
    for i, t in enumerate(times):
        final = acc if seed_accs is None else seed_accs[i]
        out.append((0 if seed_accs is None else i, records([t / 2, t], [0.5, final])))
    return out


def judge(runs, workers=None, cores=None, load=None, target=0.85):
    histories = {label: tries[0][1] for label, tries in runs.items()}
    return summary.summarise(histories, attempts=runs, workers=workers or {}, target=target, cores=cores, load=load)


def test_a_clear_winner_is_named_when_its_spread_lies_below_the_runner_up():
    s = judge({"single": attempts([3.0, 3.3, 3.1]), "periodic": attempts([2.0, 2.2, 2.1]),
               "sync": attempts([2.5, 2.6, 2.4])}, workers={"single": 1, "periodic": 2, "sync": 2}, cores=2)
    row = s.rows[1]
    assert (row.time_to_target_s, row.time_min_s, row.time_max_s, row.attempts) == (2.1, 2.0, 2.2, 3)
    text = summary.verdict(s)
    assert text.startswith("**periodic** reached the target first, after 2.10 s (median of 3, spread 2.00–2.20 s): "
                           "1.48× the speed of single (3.10 s)")
    assert verdict.lead(s.rows)[0] is row and "implausible" not in text and "Noisy" not in text
    assert "2.10 (2.00–2.20)" in summary.cells(row, s.metric)


def test_overlapping_spreads_give_no_clear_winner_and_name_the_leaders():
    s = judge({"single": attempts([5.0, 5.5]), "sync": attempts([2.0, 2.6]), "periodic": attempts([2.2, 2.9])})
    winner, leaders = verdict.lead(s.rows)
    assert winner is None and [r.label for r in leaders] == ["sync", "periodic"]
    text = summary.verdict(s)
    assert text.startswith("No clear winner: the times to target of **sync** 2.30 s (median of 2, spread "
                           "2.00–2.60 s), **periodic** 2.55 s (median of 2, spread 2.20–2.90 s) overlap across repeats.")
    assert "**single**" not in text
    # a leader that missed the target in one of its three attempts holds no clear lead
    missed = (0, records([1.0, 2.0], [0.5, 0.6]))
    s = judge({"single": attempts([5.0, 5.5, 5.2]), "sync": attempts([1.0, 1.1]) + [missed]})
    assert s.rows[1].time_max_s is None and verdict.lead(s.rows)[0] is None
    assert "1.10 s (median of 3, spread 1.00–not reached)" in summary.verdict(s)


def test_one_attempt_each_names_the_winner_but_says_the_lead_is_unchecked():
    text = summary.verdict(judge({"single": attempts([3.0]), "sync": attempts([2.0])}))
    assert text.startswith("**sync** reached the target first") and "measured once" in text


def test_a_speedup_beyond_the_workers_and_cores_is_implausible_with_its_cause():
    runs = {"single": attempts([10.0, 10.2]), "sync": attempts([1.0, 1.1])}
    s = judge(runs, workers={"single": 1, "sync": 2}, cores=2, load=(0.5, 1.0))
    assert s.rows[1].implausible and not s.rows[0].implausible
    text = summary.verdict(s)
    assert ("sync's 9.62× speedup is implausible: 2 worker(s) on 2 core(s) can give at most about 2.50×; likely "
            "cause: single was slowed, most likely by thread oversubscription") in text
    assert "(implausible)" in summary.cells(s.rows[1], s.metric)[6]
    loaded = summary.verdict(judge(runs, workers={"single": 1, "sync": 2}, cores=2, load=(3.5, 2.0)))
    assert "likely cause: the machine was loaded" in loaded
    # min(N, C) × 1.25: 4 workers on 8 cores may give up to 5×, not more
    assert verdict.speedup_limit(4, 8) == 5.0 and not verdict.implausible(5.0, 4, 8) and verdict.implausible(5.1, 4, 8)


def test_a_diverging_run_is_marked_and_cannot_win():
    assert verdict.diverging(records([1, 2, 3], [0.5, 0.9, 0.6], losses=[1.0, 0.2, 0.5]))   # > 2×0.2 and > 0.3
    assert not verdict.diverging(records([1, 2, 3], [0.5, 0.9, 0.8], losses=[1.0, 0.2, 0.35]))  # < 2× best
    assert not verdict.diverging(records([1, 2, 3], [0.5, 0.9, 0.8], losses=[1.0, 0.01, 0.05]))  # < best + 0.1
    assert verdict.diverging(records([1, 2], [0.5, 0.9], losses=[1.0, math.nan]))
    assert not verdict.diverging(records([1, 2], [0.5, 0.9], losses=[1.0, 0.5]))  # falling, never above its best
    bad = (0, records([1.0, 2.0, 3.0], [0.9, 0.9, 0.4], losses=[0.2, 0.3, 2.0]))
    s = judge({"single": attempts([3.0, 3.1]), "hogwild": [bad, bad]})
    assert s.rows[1].diverging and summary.cells(s.rows[1], s.metric)[0] == "hogwild (diverging)"
    text = summary.verdict(s)
    assert text.startswith("**single** reached the target first")  # hogwild reached it sooner, then diverged
    assert "Diverging (validation loss rose well above its best): hogwild." in text


def test_a_noisy_machine_is_named():
    runs = {"single": attempts([3.0, 3.1]), "sync": attempts([2.0, 2.1])}
    assert "Noisy machine: its load average was 2.60 before and 1.20 after the runs, above its 2 core(s)" in \
        summary.verdict(judge(runs, cores=2, load=(2.6, 1.2)))
    assert "Noisy" not in summary.verdict(judge(runs, cores=2, load=(1.9, 2.0)))


def test_the_t_interval_by_hand():
    mean, half = verdict.mean_interval([0.90, 0.92, 0.94])
    # sd = 0.02, t(0.975, 2) = 4.303: 4.303 × 0.02 / √3
    assert mean == pytest.approx(0.92) and half == pytest.approx(4.303 * 0.02 / math.sqrt(3))
    assert verdict.mean_interval([0.7]) == (0.7, None)
    assert verdict.t_quantile(1) == 12.706 and verdict.t_quantile(30) == 2.042
    assert verdict.t_quantile(40) == pytest.approx(2.0211, abs=1e-3)     # tables: 2.021
    assert verdict.t_quantile(120) == pytest.approx(1.9799, abs=1e-3)    # tables: 1.980
    s = judge({"single": attempts([3.0, 3.0, 3.0], seed_accs=[0.90, 0.92, 0.94])})
    assert s.rows[0].seeds == 3 and s.rows[0].final == pytest.approx(0.92)
    assert summary.cells(s.rows[0], s.metric)[3] == "92.00% ± 4.97%"


def test_median_and_spread_count_a_missed_target_as_slowest():
    assert verdict.median_spread([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    assert verdict.median_spread([3.0, None, 1.0]) == (3.0, 1.0, None)
    assert verdict.median_spread([None, None, 1.0]) == (None, 1.0, None)
    assert verdict.median_spread([None]) == (None, None, None)


def test_runs_are_interleaved_a_b_c_then_c_b_a():
    order = measure.schedule(["A", "B", "C"], repeats=3, seeds=1)
    assert [label for label, _, _ in order] == list("ABCCBAABC")
    assert [r for _, _, r in order] == [0] * 3 + [1] * 3 + [2] * 3
    assert measure.schedule(["A", "B"], repeats=1, seeds=2) == [("A", 0, 0), ("B", 0, 0), ("B", 1, 0), ("A", 1, 0)]
    assert measure.attempt_dir("sync", 0, 0) == "sync" and measure.attempt_dir("sync", 1, 0) == "sync.seed1.rep1"


def test_calibration_picks_the_faster_thread_count():
    import time

    from unison.launch import base

    seen = []

    def train():
        threads = base.threads_per_worker(1)
        seen.append(threads)
        time.sleep(0.02 if threads == 1 else 0.0)
    chosen, times = measure.calibrate_threads(train, cores=4)
    assert chosen == 4 and seen == [1, 4, 4, 1] and set(times) == {1, 4}
    assert base.PINNED_THREADS.get() is None  # restored after
    assert measure.calibrate_threads(train, cores=1)[0] == 1


def test_from_five_attempts_the_spread_leaves_out_the_fastest_and_the_slowest():
    assert verdict.median_spread([0.09, 0.06, 0.09, 0.10, 0.09]) == (0.09, 0.09, 0.09)
    assert verdict.median_spread([5.0, 1.0, 2.0, 3.0, 4.0, 6.0]) == (3.5, 2.0, 5.0)
    assert verdict.median_spread([1.0, 2.0, 3.0, None, None]) == (3.0, 2.0, None)
    assert verdict.median_spread([1.0, 2.0, 3.0, 4.0, None]) == (3.0, 2.0, 4.0)
