"""The compression experiment's real-link arm: two hosts (network namespaces) per run, written as
a comparison directory, and a note instead of findings where namespaces are not allowed."""

from __future__ import annotations

import json
import math

import pytest

from unison import report
from unison.config import ModelConfig
from unison.evidence import compression, document, two_hosts
from unison.evidence.base import Context, per_seed


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


def _round(epoch: int, acc: float) -> dict:
    return {"epoch": float(epoch), "step": 45 * epoch, "wall_s": 2.0 + epoch, "samples": 1438 * epoch,
            "train_loss": 1.0 / epoch, "divergence": 0.0, "comm_bytes": 1000 * epoch, "lr": 0.05, "comm_s": 0.1,
            "collectives": {"all_reduce": [45, 1000]}, "val_loss": 1.0 - acc, "val_acc": acc, "startup_s": 2.0}


def fake_train(outcomes):
    """netlab.train as it leaves things: label → seed → "ok" | "capped" | "failed"."""
    import tomllib

    from unison import netlab

    def train(run_file, out, *, rate=None, cap=600.0):
        seed = tomllib.loads(run_file.read_text())["train"]["seed"]
        outcome = outcomes[out.name.split(".")[0]][seed]
        logs = [out.parent / f"{out.name}.host{i}.log" for i in range(2)]
        for log in logs:
            log.write_text(f"host output of {out.name}\n")
        records = [_round(1, 0.9), _round(2, 0.96)]
        if outcome == "failed":
            output = "Traceback (most recent call last):\nValueError: the model blew up\n" + "=" * 40 + "\n"
            return netlab.TwoHostRun([], [1, None], False, 1.0, output, None, logs)
        where = out if outcome == "ok" else out.parent / f".{out.name}.partial-7"
        where.mkdir()
        (where / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        if outcome == "ok":
            (where / "config.toml").write_text(run_file.read_text())
            return netlab.TwoHostRun(records, [0, 0], True, 3.0, None, None, logs)
        return netlab.TwoHostRun(records, [None, None], False, cap, None, where, logs)
    return train


def test_a_failed_or_capped_two_host_run_is_kept_apart_and_the_other_seeds_still_count(tmp_path, monkeypatch):
    monkeypatch.setattr(two_hosts.netlab, "train", fake_train({"none": {0: "failed", 1: "capped"},
                                                               "int8": {0: "ok", 1: "ok"},
                                                               "fp16": {0: "failed", 1: "failed"}}))
    context = Context(seeds=[0, 1], quick=True, out=tmp_path, progress=False)
    loaded = context.over_real_link("real", {"none": "sync", "int8": "sync(compress=int8)", "fp16": "sync(compress=fp16)"},
                                    rate="100mbit", model=ModelConfig(hidden=(8,)), data="moons", target=0.95,
                                    cap=5.0, epochs=2)
    part = tmp_path / "real"
    # the arm whose first seed failed keeps its second (capped: its rounds so far), read from its own folder
    assert [seed for seed, _ in loaded.attempts["none"]] == [1] and loaded.compare["runs"]["none"]["dir"] == "none.seed1.rep1"
    assert [seed for seed, _ in loaded.attempts["int8"]] == [0, 1]
    assert "fp16" not in loaded.attempts and "every seed failed" in loaded.skipped["fp16"]
    assert sorted(p.name for p in (part / "none.seed1.rep1").iterdir()) == ["config.toml", "history.jsonl",
                                                                              "host0.log", "host1.log"]
    assert (part / "failed" / "none" / "host0.log").is_file() and not list(part.glob("*.log"))
    assert not list(part.glob(".*partial*")) and not list(part.glob("*.toml.*")) and not list(part.glob("*.seed*.toml"))
    assert context.notes[0] == ("A run failed and has no value: none (seed 0) on 100mbit: "
                                "`ValueError: the model blew up`")  # as code: a log line is no Markdown
    assert len(context.notes) == 3
    assert per_seed(loaded, "none", compression._trained_to_target) == [pytest.approx(math.nan, nan_ok=True), 2.0]
    html = (part / report.REPORT_HTML).read_text()
    assert "2 hosts × 1 process(es), link 100mbit" in html and "moons" in html


def test_the_token_bucket_is_a_millisecond_of_the_rate_and_at_least_two_frames():
    from unison import netlab

    assert (netlab.burst("100mbit"), netlab.burst("1gbit"), netlab.burst("10mbit")) == (12_500, 125_000, 3028)


def test_a_real_link_where_every_run_failed_gives_notes_not_findings(tmp_path, monkeypatch):
    labels = ("none", "fp16", "int8", "powersgd-4", "powersgd-4-alternate-true")
    monkeypatch.setattr(two_hosts.netlab, "train", fake_train({label: {0: "failed", 1: "failed", 2: "failed"}
                                                               for label in labels}))
    monkeypatch.setattr(two_hosts, "link_rate", lambda rate: 1e8)
    context = Context(seeds=[0, 1, 2], quick=True, out=tmp_path, progress=False)
    runs = {"none": "sync"} | {label: f"sync(compress={spec})" for label, spec in compression.COMPRESSORS.items()}
    assert compression.measured_on_real_links(context, runs) == []
    assert [note for note in context.notes if note.startswith("The real")] == [
        f"The real {name} link gave no finding: every run on it failed." for name in compression.REAL_LINKS]
    assert len(context.notes) == 2 + 2 * len(labels) * 3  # and one line per failed run


def test_hosts_that_cannot_be_made_are_a_failed_run_not_a_crash(tmp_path, monkeypatch):
    import subprocess

    def cannot(run_file, out, **_):
        (out.parent / f"{out.name}.host0.log").write_text("")
        raise subprocess.CalledProcessError(2, ["ip", "netns", "add", "x"])
    monkeypatch.setattr(two_hosts.netlab, "train", cannot)
    context = Context(seeds=[0], quick=True, out=tmp_path, progress=False)
    loaded = context.over_real_link("real", {"none": "sync"}, rate=None, model=ModelConfig(hidden=(8,)),
                                    data="moons", target=0.9, cap=5.0, epochs=1)
    assert loaded.attempts == {} and "every seed failed" in loaded.skipped["none"]
    assert context.notes[0].startswith("A run failed and has no value: none (seed 0) on veth (unthrottled): "
                                       "the hosts could not run it: `Command '['ip', 'netns', 'add', 'x']'")
    assert (tmp_path / "real" / "failed" / "none" / "host0.log").is_file()
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["config.toml", "failed"]  # no run file left
