"""The compression experiment's real-link arm: two hosts (network namespaces) per run, written as
a comparison directory, and a note instead of findings where namespaces are not allowed."""

from __future__ import annotations

import json
import math

import pytest

from unison import report
from unison.config import ModelConfig
from unison.evidence import compression, document, two_hosts
from unison.evidence.base import Context


def test_where_namespaces_are_not_allowed_the_document_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(compression, "modelled", lambda context, runs: [])
    monkeypatch.setattr(two_hosts, "available", lambda: "network namespaces need root")
    context = Context(seeds=[0, 1, 2], quick=True, out=tmp_path, progress=False)
    assert compression.measure(context) == []
    assert context.notes == ["The real two-host link was not used: network namespaces need root. Run as root where "
                             "`ip netns` is allowed to add its findings (measured, not modelled)."]
    result = {"name": "compression", "text": {k: "" for k in ("paper", "claim", "paper_figure", "setup", "caveat")},
              "seeds": [0, 1, 2], "quick": True, "findings": [], "verdicts": [], "parts": [], "elapsed_s": 1.0,
              "cores": 2, "machine": "x", "date": "today", "notes": context.notes}
    assert f"**Note.** {context.notes[0]}" in document.section(result, tmp_path, tmp_path)


def test_time_to_target_is_training_time_and_a_miss_is_slower_than_any_time():
    records = [{"wall_s": 3.0, "startup_s": 2.0, "val_acc": 0.5}, {"wall_s": 4.5, "startup_s": 2.0, "val_acc": 0.95}]
    assert compression._trained_to_target(records) == pytest.approx(2.5)
    assert compression._trained_to_target(records[:1]) == math.inf
    assert math.isnan(compression._trained_to_target([]))  # the run failed: no value


@pytest.mark.multiprocess
@pytest.mark.netns
@pytest.mark.skipif(two_hosts.available() is not None, reason=str(two_hosts.available()))
@pytest.mark.timeout(240)
def test_a_part_over_the_real_link_is_a_comparison_of_every_arm_and_seed(tmp_path):
    context = Context(seeds=[3, 4], quick=True, out=tmp_path, progress=False)
    loaded = context.over_real_link("real", {"none": "sync", "int8": "sync(compress=int8)"}, rate="100mbit",
                                    model=ModelConfig(hidden=(256,)), data="moons", target=0.8, cap=60.0,
                                    epochs=1, batch_size=32, lr=0.1, timeout=30.0)
    assert context.parts == ["real"] and context.notes == []
    assert {label: [seed for seed, _ in runs] for label, runs in loaded.attempts.items()} == \
        {"none": [3, 4], "int8": [3, 4]}
    first = {label: runs[0][1][-1] for label, runs in loaded.attempts.items()}
    # counted on the link: int8 sends about a quarter of sync's bytes (plus its scales and the bookkeeping)
    assert 0.2 < first["int8"]["comm_bytes"] / first["none"]["comm_bytes"] < 0.5
    # each seed trained from its own start: the same arm's two seeds end apart
    (_, seed3), (_, seed4) = loaded.attempts["none"]
    assert seed3[-1]["train_loss"] != seed4[-1]["train_loss"]
    assert (tmp_path / "real" / report.REPORT_HTML).is_file()
    settings = (tmp_path / "real" / "none.seed1.rep1" / "config.toml").read_text()
    assert "seed = 4" in settings and 'backend = "torchrun"' in settings  # it ran under torchrun
    assert not list((tmp_path / "real").glob("*.toml.partial*")) and not list((tmp_path / "real").glob("*.log"))
    assert json.loads(json.dumps(loaded.compare["hosts"])) == {"count": 2, "processes_per_host": 1, "link": "100mbit"}
