"""unison reproduce: the verdict rule, the document and the command's errors."""

from __future__ import annotations

import json
import math

import pytest

from unison import cli, evidence
from unison.errors import ConfigError
from unison.evidence.base import Context, Experiment, Finding, first_reaching, ratio
from unison.evidence.judge import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, judge, needed
from unison.verdict import mean_interval


def test_the_direction_must_hold_in_four_of_five_seeds_or_three_of_three():
    assert (needed(5), needed(3), needed(10)) == (4, 3, 8)
    assert judge([0.1, 0.2, -0.1, 0.3, 0.2]).verdict == REPRODUCED
    assert judge([0.1, -0.2, -0.1, 0.3, 0.2]).verdict == INCONCLUSIVE
    assert judge([-0.1, -0.2, -0.1, 0.3, -0.2]).verdict == NOT_REPRODUCED
    assert judge([0.1, 0.2, -0.1]).verdict == INCONCLUSIVE  # 2 of 3 is not enough


def test_a_seed_without_an_effect_counts_neither_way_and_stays_out_of_the_mean():
    verdict = judge([2.0, math.nan, 3.0, 4.0, 5.0], threshold=1.0)
    assert (verdict.holds, verdict.missed, verdict.verdict) == (4, 1, REPRODUCED)
    assert verdict.mean == pytest.approx(mean_interval([2.0, 3.0, 4.0, 5.0])[0])
    assert "4 of 5 seeds, 1 without an effect; 4 needed" in verdict.text()
    assert judge([math.nan, math.nan, 2.0], threshold=1.0).verdict == INCONCLUSIVE
    assert judge([1.0, 0.5, 0.0], threshold=1.0).verdict == NOT_REPRODUCED  # a tie fails the direction
    assert judge([math.inf, 2.0, 3.0], threshold=1.0).mean == pytest.approx(2.5)  # inf holds, out of the mean


def test_ratios_and_first_reaching_read_records():
    records = [{"step": 10, "val_acc": 0.5}, {"step": 20, "val_acc": 0.8}, {"step": 30, "val_acc": 0.9}]
    assert first_reaching(0.8)(records) == 20
    assert math.isnan(first_reaching(0.95)(records))
    assert ratio([20.0, math.nan], [10.0, 5.0]) == [2.0, pytest.approx(math.nan, nan_ok=True)]
    with pytest.raises(ValueError, match="mispaired"):
        ratio([1.0, 2.0], [1.0])


def test_per_seed_pairs_by_seed_and_a_repeat_that_missed_counts_as_the_worst():
    from unison.evidence.base import median_of, per_seed
    from unison.report import Loaded

    at = first_reaching(0.8)
    run = lambda step: [{"step": step, "val_acc": 0.9}]  # noqa: E731
    missed = [{"step": 5, "val_acc": 0.1}]
    loaded = Loaded(histories={}, attempts={"a": [(0, run(10)), (1, run(20)), (2, run(30))],
                                            "b": [(1, run(7)), (2, run(8)), (2, missed), (2, missed)]})
    assert per_seed(loaded, "a", at) == [10, 20, 30]
    b = per_seed(loaded, "b", at)  # seed 0 lacks b: nan, not b's seed 1 shifted into its place
    assert math.isnan(b[0]) and b[1] == 7 and math.isnan(b[2])  # 2 of 3 repeats missed: the median did
    assert median_of([3.0, math.nan, 1.0]) == 3.0 and median_of([1.0, 2.0, 4.0, math.nan]) == 3.0


def _toy(effects):
    def measure(context: Context) -> list[Finding]:
        return [Finding(claim="a beats b", metric="m", arms={"a": [1.0] * len(context.seeds),
                                                              "b": [0.0] * len(context.seeds)},
                        effect="a − b", effects=effects[:len(context.seeds)])]
    return Experiment(name="drift", paper="Someone 2020, A paper", claim="c", paper_figure="f", setup="s",
                      caveat="small", measure=measure)


def test_reproduce_writes_the_verdict_and_the_document(tmp_path, monkeypatch):
    monkeypatch.setattr(evidence, "experiment", lambda name: _toy([1.0, 1.0, -1.0, 1.0, 1.0]))
    found = evidence.reproduce("drift", out=tmp_path, progress=False)
    assert found.verdicts[0].verdict == REPRODUCED and found.verdicts[0].holds == 4
    saved = json.loads((tmp_path / "drift" / evidence.RESULT_FILE).read_text())
    assert saved["seeds"] == [0, 1, 2, 3, 4] and saved["verdicts"][0]["verdict"] == REPRODUCED
    assert saved["text"]["caveat"] == "small"  # the section describes what was run, not today's code
    text = (tmp_path / "evidence.md").read_text()
    assert "## drift" in text and "held in 4 of 5 seeds (4 needed)" in text and "](drift/findings.png)" in text
    assert f"`unison reproduce drift --out {tmp_path}`" in text  # the command that rewrites these folders
    assert (tmp_path / "drift" / "findings.png").stat().st_size > 1000
    with pytest.raises(ConfigError, match="already exists"):  # an earlier result is kept
        evidence.reproduce("drift", out=tmp_path, progress=False)
    assert json.loads((tmp_path / "drift" / evidence.RESULT_FILE).read_text()) == saved


def test_a_failing_experiment_leaves_the_earlier_result(tmp_path, monkeypatch):
    monkeypatch.setattr(evidence, "experiment", lambda name: _toy([1.0] * 5))
    evidence.reproduce("drift", out=tmp_path, progress=False)
    before = (tmp_path / "drift" / evidence.RESULT_FILE).read_text()
    monkeypatch.setattr(evidence, "experiment", lambda name: _toy([]))  # judge refuses no seeds
    with pytest.raises(ValueError):
        evidence.reproduce("drift", out=tmp_path, overwrite=True, progress=False)
    assert (tmp_path / "drift" / evidence.RESULT_FILE).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drift", "evidence.md"]


@pytest.mark.parametrize("argv, message", [
    (["reproduce", "nope"], "experiment='nope' is not accepted; expected 'fedavg'"),
    (["reproduce"], "reproduce needs an experiment"),
    (["reproduce", "drift", "--seeds", "2"], "seeds"),
    (["reproduce", "drift", "--list"], "takes no experiment name"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    assert cli.main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_list_names_every_experiment_with_its_paper(capsys):
    assert cli.main(["reproduce", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(evidence.NAMES)
    assert all(" et al. " in line or "20" in line for line in lines)


def test_a_timed_experiment_on_a_loaded_machine_says_its_verdicts_may_not_hold(tmp_path, monkeypatch):
    import dataclasses

    from unison import measure

    timed = dataclasses.replace(_toy([1.0] * 3), timed=True)
    monkeypatch.setattr(evidence, "experiment", lambda name: timed)
    monkeypatch.setattr(measure, "machine_load", lambda: 99.0)
    found = evidence.reproduce("drift", out=tmp_path, seeds=3, progress=False)
    assert "load average reached 99" in found.summary() and "may not hold" in found.summary()
    assert "**Warning:** the machine's load average reached 99" in (tmp_path / "evidence.md").read_text()
    monkeypatch.setattr(evidence, "experiment", lambda name: _toy([1.0] * 3))  # not timed: no warning
    assert evidence.reproduce("drift", out=tmp_path, seeds=3, overwrite=True, progress=False).loaded is None


def test_the_document_path_is_checked_before_anything_trains(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(evidence, "experiment", lambda name: _toy(trained.append(1) or [1.0] * 5))
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    for doc, message in ((tmp_path, "is a directory"), (notes, "was not written by unison reproduce")):
        with pytest.raises(ConfigError, match=message):
            evidence.reproduce("drift", out=tmp_path / "out", doc=doc, progress=False)
    assert notes.read_text() == "# my notes\n" and not (tmp_path / "out").exists()


def test_a_result_of_another_format_is_left_out_of_the_document(tmp_path, monkeypatch):
    monkeypatch.setattr(evidence, "experiment", lambda name: _toy([1.0] * 3))
    evidence.reproduce("drift", out=tmp_path, seeds=3, progress=False)
    (tmp_path / "compression").mkdir()
    (tmp_path / "compression" / evidence.RESULT_FILE).write_text('{"name": "compression"}')
    with pytest.warns(UserWarning, match="another version"):
        evidence.write_document(tmp_path, tmp_path / "evidence.md")
    text = (tmp_path / "evidence.md").read_text()
    assert "## drift" in text and "## compression" not in text
    assert f"`unison reproduce drift --seeds 3 --out {tmp_path}`" in text  # 3 is not a full run's default


def fake_compare(make):
    """Context.compare's stand-in: each run's records per seed from ``make(label, seed)``."""
    from unison.report import Loaded

    def compare(context, part, strategies, **settings):
        attempts = {label: [(seed, make(label, seed)) for seed in context.seeds] for label in strategies}
        return Loaded(histories={label: runs[0][1] for label, runs in attempts.items()}, attempts=attempts)
    return compare


def test_drift_effects_are_the_per_seed_accuracy_differences(tmp_path, monkeypatch):
    from unison.evidence import drift

    accuracy = {"periodic α=100": 0.95, "periodic α=1": 0.9, "periodic α=0.1": 0.8, "fedprox μ=0.01 α=0.1": 0.7,
                "fedprox μ=0.1 α=0.1": 0.75, "scaffold α=0.1": 0.85}
    monkeypatch.setattr(Context, "compare", fake_compare(lambda label, seed: [{"step": 1, "val_acc": 0.1},
                                                                       {"step": 2,
                                                                        "val_acc": accuracy[label] + seed / 100}]))
    found = drift.measure(Context(seeds=[0, 1, 2], quick=True, out=tmp_path, progress=False))
    assert [f.effects for f in found] == [pytest.approx([0.15] * 3), pytest.approx([-0.1] * 3),
                                          pytest.approx([-0.05] * 3), pytest.approx([0.05] * 3)]
    assert found[0].arms["periodic α=1"] == pytest.approx([0.9, 0.91, 0.92])


def test_compression_times_each_compressor_on_each_link_and_a_miss_cannot_pay(tmp_path, monkeypatch):
    from unison import linkmodel
    from unison.evidence import compression

    def records(label, seed):  # one epoch of compute, then the target; collectives shrink with compression
        payload = {"none": 4000, "fp16": 2000, "int8": 1000, "powersgd(4)": 400,
                   "powersgd(4, alternate=true)": 200}[label] * 1000
        last = 0.5 if (label, seed) == ("int8", 2) else 0.95  # int8 misses the target in seed 2
        return [{"step": 10, "epoch": 1.0, "wall_s": 0.1, "comm_s": 0.0, "val_acc": 0.5,
                 "collectives": {"all_reduce": [10, payload]}},
                {"step": 20, "epoch": 2.0, "wall_s": 0.2, "comm_s": 0.0, "val_acc": last,
                 "collectives": {"all_reduce": [10, payload]}}]

    monkeypatch.setattr(Context, "compare", fake_compare(records))
    monkeypatch.setattr(compression.two_hosts, "available", lambda: "not here")  # the modelled links only
    found = compression.measure(Context(seeds=[0, 1, 2], quick=True, out=tmp_path, progress=False))
    assert len(found) == 2 * len(compression.COMPRESSORS) == 8
    for finding in found:
        link = linkmodel.parse(compression.LINKS["slow" if "slow" in finding.claim else "fast"])
        label = next(c for c in compression.COMPRESSORS if f" {c} " in finding.claim)
        none, compressed = (linkmodel.retimed(records(arm, 0), compression.WORKERS, link)[1]["wall_s"]
                            for arm in ("none", label))
        expected = none / compressed - 1 if "slow" in finding.claim else compressed / none - 1
        assert finding.effects[0] == pytest.approx(expected)
        if label == "int8":  # never reached: no speed-up on the slow link, never sooner on the fast one
            assert finding.effects[2] == (-1.0 if "slow" in finding.claim else math.inf)
    fast_fp16 = next(f for f in found if "fast" in f.claim and " fp16 " in f.claim)
    assert fast_fp16.effects[0] < 0  # same compute, fewer bytes: fp16 pays when nothing else costs


@pytest.mark.slow
def test_reproduce_drift_quick_end_to_end(tmp_path, capsys):
    """The command as CI runs it: its verdicts follow from the comparison it wrote."""
    from unison.report import load

    assert cli.main(["reproduce", "drift", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "drift" / evidence.RESULT_FILE).read_text())
    loaded = load(tmp_path / "drift" / "skew")  # the comparison, with its report
    assert (tmp_path / "drift" / "skew" / "report.html").is_file()
    finals = {label: [records[-1]["val_acc"] for seed, records in sorted(runs)]
              for label, runs in loaded.attempts.items()}
    assert saved["findings"][0]["effects"] == pytest.approx(
        [a - b for a, b in zip(finals["periodic α=100"], finals["periodic α=0.1"])])
    for finding, verdict in zip(saved["findings"], saved["verdicts"]):
        assert verdict == json.loads(json.dumps(judge(finding["effects"]).__dict__))
        assert f"{finding['claim']}: {verdict['verdict']} (the direction held in {verdict['holds']} of 3 seeds" in out
    assert "## drift" in (tmp_path / "evidence.md").read_text()


def test_doc_only_rewrites_the_document_from_saved_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evidence, "experiment", lambda name: _toy([1.0] * 3))
    assert cli.main(["reproduce", "--doc-only", "--out", str(tmp_path)]) == 2  # nothing saved yet
    assert "no results of unison reproduce" in capsys.readouterr().err
    evidence.reproduce("drift", out=tmp_path, seeds=3, progress=False)
    (tmp_path / "evidence.md").unlink()
    assert cli.main(["reproduce", "--doc-only", "--out", str(tmp_path)]) == 0
    assert "## drift" in (tmp_path / "evidence.md").read_text()
