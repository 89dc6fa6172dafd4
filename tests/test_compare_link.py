"""compare(link=...) and `unison compare --link`: modelled columns and series next to the
measured ones, each labelled, the winner on the link named from the modelled times."""

import csv
import io

import pytest

import unison
from unison import report, summary
from unison.cli import main
from unison.errors import ConfigError

LINK = "10mbit,5ms"


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    import torch

    from toy_models import blobs_data
    from unison.models import mlp

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("link") / "cmp"
    result = unison.compare(mlp(8, [16], 3), blobs_data(), 0.25, strategies="single,sync,periodic(every=3)",
                            workers=2, backend="threads", epochs=3, batch_size=8, lr=0.1, progress=False,
                            out=out, repeat=1, link="10mbit, 5ms")
    return result


def test_the_table_labels_measured_and_modelled_figures(compared):
    s = compared.summary
    assert s.link == LINK  # in its normal form
    head = summary.headers(s)
    assert [h for h in head if "modelled" in h] == [f"time to {summary.metric_text(s.target, s.metric)} "
                                                    f"(s, modelled: link {LINK})", f"epoch (s, modelled: link {LINK})"]
    assert any("measured" in h and h.startswith("time to") for h in head) and "epoch (s, measured)" in head
    assert f"Modelled (link {LINK}): each round's measured compute" in compared.table()
    rows = {r.label: r for r in s.rows}
    # one worker sends nothing: modelled = measured; sync pays 2·5 ms a step on the link
    single, sync = rows["single"], rows["sync"]
    assert single.link_epoch_s == pytest.approx(single.epoch_s)
    steps_per_epoch = compared.results["sync"].history[0]["step"]
    assert sync.link_epoch_s >= steps_per_epoch * 2 * 0.005  # the latency terms alone
    assert rows["periodic(every=3)"].link_epoch_s < sync.link_epoch_s  # a third of the messages
    for row in s.rows:
        assert len(summary.cells(row, s.metric, s.link)) == len(head)


def test_the_winner_on_the_link_comes_from_the_modelled_times(compared):
    s = compared.summary
    on_link = [r for r in summary.on_link(s.rows) if r.time_to_target_s is not None]
    fastest = min(on_link, key=lambda r: r.time_to_target_s)
    assert compared.winner in (None, fastest.label)
    assert f"On a {LINK} link (modelled" in summary.verdict(s)


def test_the_files_carry_the_modelled_figures_and_rebuild_alike(compared):
    out = compared.out
    rows = list(csv.DictReader(io.StringIO((out / report.SUMMARY_CSV).read_text())))
    assert all(r["link"] == LINK and float(r["link_epoch_s"]) > 0 and float(r["epoch_s"]) > 0 for r in rows)
    page = (out / report.REPORT_HTML).read_text()
    assert f"modelled: link {LINK}" in page and f"Modelled (link {LINK})" in page
    before = (out / report.SUMMARY_MD).read_text()
    rebuilt = report.build(out)  # `unison report DIR` models the same link from the histories alone
    assert rebuilt.link == LINK and (out / report.SUMMARY_MD).read_text() == before


def test_a_bad_link_is_refused_before_any_run(tmp_path, blobs, small_model):
    with pytest.raises(ConfigError, match="link.*accepted"):
        unison.compare(small_model, blobs, 0.25, strategies="single,sync", backend="threads", progress=False,
                       out=tmp_path / "cmp", link="fast")
    assert not (tmp_path / "cmp").exists()


def test_the_cli_refuses_a_bad_link_in_one_line(tmp_path, capsys):
    assert main(["compare", "--link", "100mb", "--out", str(tmp_path / "c"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "link" in err and "100mbit,20ms" in err


def test_stacked_workers_beyond_the_cores_are_modelled_as_separate_workers(tmp_path, blobs, small_model):
    workers = 8  # more than this machine's cores: one process, eight rows that send nothing
    result = unison.compare(small_model, blobs, 0.25, strategies="sync", workers=workers, backend="stacked",
                            epochs=2, batch_size=4, lr=0.1, progress=False, out=tmp_path / "cmp", repeat=1,
                            link="1mbit,10ms")
    history = result.results["sync"].history
    row = result.summary.rows[0]
    assert history[-1]["comm_bytes"] == 0 and history[0]["stacked_rows"] == workers
    steps = history[0]["step"]
    assert history[0]["collectives"]["all_reduce"][0] == steps  # one gradient all-reduce a step, as 8 workers
    # each step: a ring of 8 workers, 14 latency terms of 10 ms; compute an eighth of the stacked process's
    assert row.link_epoch_s >= steps * 14 * 0.010
    assert row.link_epoch_s <= row.epoch_s / workers + steps * 14 * 0.010 + 1.0


def test_runs_that_cannot_be_modelled_say_so_and_never_win_on_the_link(tmp_path):
    """Declared speeds= (a fast worker's wait for the slow one sits inside its collectives) are
    shown "not modelled" (found in review: speeds made sync look faster on the link than without
    them); fedbuff is modelled from its server's messages (linkmodel's asynchronous rounds)."""
    import torch

    from toy_models import blobs_data
    from unison.models import mlp

    torch.manual_seed(0)
    result = unison.compare(mlp(8, [16], 3), blobs_data(), 0.25, progress=False, out=tmp_path / "cmp", repeat=1,
                            strategies={"sync": "sync", "fedbuff": "fedbuff(every=3)",
                                        "slow sync": {"strategy": "sync", "speeds": [1, 0.5]}},
                            workers=2, backend="threads", epochs=2, batch_size=8, lr=0.1, link=LINK)
    rows = {r.label: r for r in result.summary.rows}
    assert rows["sync"].link_modelled and rows["fedbuff"].link_modelled
    assert not rows["slow sync"].link_modelled
    table = result.table()
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "not modelled" in lines["slow sync"]
    assert "not modelled" not in lines["sync"] and "not modelled" not in lines["fedbuff"]
    assert result.winner in (None, "sync", "fedbuff")
