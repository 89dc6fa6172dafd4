"""compare's fair measurement end to end: --repeat/--seeds/--threads parsed and refused in one
line, every attempt written and read back, and report.html checked in headless Chromium."""

import shutil
import subprocess
import tomllib

import pytest
import torch
import tomli_w

import unison
from unison import report
from unison.cli import main
from unison.errors import ConfigError
from unison.history import write_jsonl

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if shutil.os.path.exists("/usr/bin/chromium") else None)


@pytest.mark.parametrize("args, words", [
    (["--repeat", "0"], ["repeat=0", "an integer in [1, 100]"]),
    (["--repeat", "two"], ["repeat='two'", "an integer in [1, 100]"]),
    (["--seeds", "0"], ["seeds=0", "an integer in [1, 100]"]),
    (["--threads", "0"], ["threads=0", "an integer in [1, "]),
    (["--threads", "100000"], ["threads=100000"]),
])
def test_bad_measurement_flags_print_one_line_and_exit_2(tmp_path, capsys, args, words):
    assert main(["compare", "--backend", "threads", "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unison: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err
    assert not (tmp_path / "x").exists()


def test_a_bad_repeat_is_a_config_error_naming_the_field(blobs, small_model, tmp_path):
    with pytest.raises(ConfigError, match=r"repeat=-1 is not accepted; expected an integer in \[1, 100\]"):
        unison.compare(small_model, blobs, 0.25, strategies="single", repeat=-1, out=tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="seeds=1.5"):
        unison.compare(small_model, blobs, 0.25, strategies="single", seeds=1.5, out=tmp_path / "x", progress=False)


def test_repeats_and_seeds_are_written_read_back_and_summarised(tmp_path, blobs, small_model, capsys):
    threads_before = torch.get_num_threads()
    result = unison.compare(small_model, blobs, 0.25, strategies="single,sync", workers=2, backend="threads",
                            epochs=2, batch_size=8, lr=0.1, out=tmp_path / "cmp", repeat=2, seeds=2, threads=1)
    assert torch.get_num_threads() == threads_before  # the pinned count applied per run, then restored
    printed = capsys.readouterr().out
    order = [line.split("] ", 1)[1].split(":")[0] for line in printed.splitlines() if line.startswith("[")]
    assert order == ["single (seed 0, repeat 1)", "sync (seed 0, repeat 1)", "sync (seed 0, repeat 2)",
                     "single (seed 0, repeat 2)", "single (seed 1, repeat 1)", "sync (seed 1, repeat 1)",
                     "sync (seed 1, repeat 2)", "single (seed 1, repeat 2)"]
    out = tmp_path / "cmp"
    top = tomllib.loads((out / "config.toml").read_text())["compare"]
    assert (top["repeat"], top["seeds"]) == (2, 2)
    assert top["budget"]["single_threads"] == 1 and top["budget"]["single_threads_from"] == "pinned (--threads)"
    assert "N workers × threads per worker" in top["budget"]["rule"]
    assert {"load_before", "load_after"} <= set(top["machine"])
    assert [a["dir"] for a in top["runs"]["sync"]["attempts"]] == ["sync", "sync.seed0.rep2", "sync.seed1.rep1",
                                                                   "sync.seed1.rep2"]
    for attempt in top["runs"]["sync"]["attempts"]:
        assert (out / attempt["dir"] / "history.jsonl").is_file()
    rows = {row.label: row for row in result.summary.rows}
    assert (rows["sync"].attempts, rows["sync"].seeds) == (4, 2)
    page = (out / "report.html").read_text()
    assert "compute budget" in page and "interleaved order" in page
    before = (out / "summary.md").read_text()
    report.build(out)  # the summary is rebuilt from the files alone, attempts included
    assert (out / "summary.md").read_text() == before


def _history(walls, accs, losses):
    return [{"epoch": float(i + 1), "step": i + 1, "wall_s": w, "samples": 64 * (i + 1), "train_loss": loss,
             "val_loss": loss, "val_acc": acc, "divergence": 0.01, "comm_bytes": 1000 * i, "startup_s": 0.05}
            for i, (w, acc, loss) in enumerate(zip(walls, accs, losses))]


def synthetic_comparison(out):
    """A comparison folder written by hand: single slow, sync fast on both repeats (a clear
    winner), hogwild diverging after reaching the target."""
    runs = {"single": [(0.7, 0.0), (0.75, 0.0)], "sync": [(0.4, 0.0), (0.45, 0.0)], "hogwild": [(0.2, 1.0)] * 2}
    table = {"strategies": list(runs), "reference": "single", "target_fraction": 0.98, "repeat": 2, "seeds": 1,
             "runs": {}, "world_sizes": {"single": 1, "sync": 2, "hogwild": 2},
             "budget": {"rule": "each run may use all 2 core(s)", "cores": 2, "single_threads": 1,
                        "single_threads_from": "calibrated", "calibration_s": {"1": 0.01, "2": 0.02}},
             "machine": {"cores": 2, "load_before": 0.5, "load_after": 1.0}}
    for label, tries in runs.items():
        table["runs"][label] = {"dir": label, "strategy": label, "attempts": []}
        for repeat, (end, blow_up) in enumerate(tries, start=1):
            folder = label if repeat == 1 else f"{label}.seed0.rep{repeat}"
            (out / folder).mkdir(parents=True)
            walls = [end * (i + 1) / 4 for i in range(4)]
            losses = [0.8, 0.3, 0.2, 0.2] if not blow_up else [0.8, 0.2, 0.9, 3.0]
            write_jsonl(out / folder / "history.jsonl", _history(walls, [0.5, 0.9, 0.95, 0.95], losses))
            table["runs"][label]["attempts"].append({"dir": folder, "seed": 0, "repeat": repeat})
    (out / "config.toml").write_text(tomli_w.dumps({"data": {"dataset": "digits", "val_fraction": 0.2},
                                                    "compare": table}))
    return report.build(out)


def test_report_marks_the_winner_and_the_diverging_run(tmp_path):
    summary = synthetic_comparison(tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert '<tr class="winner"><td>sync</td>' in page
    assert '<tr class="diverging"><td>hogwild (diverging)</td>' in page
    assert page.count('src="data:image/png;base64,') == 5 and 'alt="time_to_target.png"' in page
    assert "0.32 (0.30–0.34)" in page and "(implausible)" in page  # the spread; hogwild's 3.6× on 2 cores
    assert "**sync**" in (tmp_path / "summary.md").read_text() and "Diverging" in page
    assert [row.label for row in summary.rows if row.diverging] == ["hogwild"]


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    synthetic_comparison(tmp_path / "cmp")
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1280,2000", (tmp_path / "cmp" / "report.html").as_uri()],
                   capture_output=True, timeout=90, check=False)
    assert shot.is_file() and shot.stat().st_size > 20_000
    with Image.open(shot) as image:
        assert image.size == (1280, 2000)
        colours = image.convert("RGB").resize((64, 100)).getcolors(maxcolors=100_000)
    assert colours is not None and len(colours) > 50  # text, a table and plots, not a blank page


def test_a_run_file_sets_repeat_and_a_flag_overrides_it(tmp_path, capsys):
    run_file = tmp_path / "run.toml"
    run_file.write_text('[train]\nbackend = "threads"\n[compare]\nstrategies = ["single"]\nrepeat = 0\n')
    assert main(["compare", str(run_file), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "repeat=0 is not accepted; expected an integer in [1, 100]" in err
    assert main(["compare", str(run_file), "--repeat", "-3", "--out", str(tmp_path / "a")]) == 2
    assert "repeat=-3" in capsys.readouterr().err
