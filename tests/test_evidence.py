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


def test_a_seed_that_missed_counts_against_the_direction_and_out_of_the_mean():
    verdict = judge([2.0, math.nan, 3.0, 4.0, 5.0], threshold=1.0)
    assert verdict.holds == 4 and verdict.verdict == REPRODUCED
    assert verdict.mean == pytest.approx(mean_interval([2.0, 3.0, 4.0, 5.0])[0])
    assert judge([math.nan, math.nan, 2.0], threshold=1.0).verdict == INCONCLUSIVE
    assert judge([1.0, 0.5, 2.0], threshold=1.0).verdict == INCONCLUSIVE  # at the threshold: not above


def test_ratios_and_first_reaching_read_records():
    records = [{"step": 10, "val_acc": 0.5}, {"step": 20, "val_acc": 0.8}, {"step": 30, "val_acc": 0.9}]
    assert first_reaching(0.8)(records) == 20
    assert math.isnan(first_reaching(0.95)(records))
    assert ratio([20.0, math.nan], [10.0, 5.0]) == [2.0, pytest.approx(math.nan, nan_ok=True)]


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
    assert found.verdict == REPRODUCED and found.verdicts[0].holds == 4
    saved = json.loads((tmp_path / "drift" / evidence.RESULT_FILE).read_text())
    assert saved["seeds"] == [0, 1, 2, 3, 4] and saved["verdicts"][0]["verdict"] == REPRODUCED
    text = (tmp_path / "evidence.md").read_text()
    assert "## drift" in text and "held in 4 of 5 seeds" in text and "](drift/findings.png)" in text
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
