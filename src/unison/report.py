"""A comparison's summary, plots and self-contained HTML report, built from its directory alone.

A comparison directory holds ``config.toml`` (the settings; its ``[compare]`` table lists the
runs in order, each run's sub-directory, and what was skipped) and per run a sub-directory
with ``config.toml`` and ``history.jsonl``. build() reads only those files, so ``unison
report DIR`` after the fact writes exactly what ``unison compare`` wrote at the end of its run.
Plots use matplotlib's object API (Figure + Agg canvas): no pyplot state, no display needed.
"""

from __future__ import annotations

import base64
import html
import re
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import linkmodel
from . import summary as summaries
from . import verdict as verdicts
from .errors import ConfigError
from .history import read_jsonl

CONFIG_FILE, HISTORY_FILE = "config.toml", "history.jsonl"
SUMMARY_MD, SUMMARY_CSV, REPORT_HTML = "summary.md", "summary.csv", "report.html"
LOSS_PLOT, DIVERGENCE_PLOT, THROUGHPUT_PLOT = "val_loss_vs_epoch.png", "divergence_vs_round.png", "throughput.png"
INTERVALS_PLOT = "time_to_target.png"


def time_plot_name(metric: str) -> str:
    return f"{metric}_vs_time.png"


@dataclass
class Loaded:
    """What a comparison directory says: the runs' histories in order and how they were run."""

    histories: dict[str, list[dict[str, Any]]]
    workers: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)      # the top config.toml
    skipped: dict[str, str] = field(default_factory=dict)       # label -> why it did not run
    attempts: dict[str, list[tuple[int, list[dict[str, Any]]]]] = field(default_factory=dict)  # (seed, records)

    @property
    def compare(self) -> dict[str, Any]:
        return self.settings.get("compare", {})


def load(run_dir: str | Path) -> Loaded:
    """Read a comparison directory (see the module docstring); a `unison train` run directory
    reads as a comparison of one run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} does not exist")
    settings = _toml(run_dir / CONFIG_FILE) if (run_dir / CONFIG_FILE).is_file() else {}
    runs = settings.get("compare", {}).get("runs", {})
    if runs:
        dirs = {label: run_dir / runs[label]["dir"] for label in settings["compare"].get("strategies", runs)
                if label in runs}
    elif (run_dir / HISTORY_FILE).is_file():  # one run, as `unison train` writes it
        dirs = {str(settings.get("train", {}).get("strategy", run_dir.name)): run_dir}
    else:  # no config: every sub-directory with a history, by name
        dirs = {path.parent.name: path.parent for path in sorted(run_dir.glob(f"*/{HISTORY_FILE}"))}
    loaded = Loaded(histories={}, settings=settings, skipped=dict(settings.get("compare", {}).get("skipped", {})))
    for label, path in dirs.items():
        if not (path / HISTORY_FILE).is_file():
            continue
        records = read_jsonl(path / HISTORY_FILE)
        if records:
            loaded.histories[label] = records
            loaded.attempts[label] = [(0, records)]
            listed = runs.get(label, {}).get("attempts", [])
            if listed:  # repeats and seeds: every attempt's history, the first one's for the plots
                loaded.attempts[label] = [(int(a.get("seed", 0)), read_jsonl(run_dir / a["dir"] / HISTORY_FILE))
                                          for a in listed if (run_dir / a["dir"] / HISTORY_FILE).is_file()]
            # the run's world size as compare recorded it (single: 1), else the workers asked for
            workers = settings.get("compare", {}).get("world_sizes", {}).get(label)
            if workers is None and (path / CONFIG_FILE).is_file():
                workers = _toml(path / CONFIG_FILE).get("train", {}).get("workers")
            if workers is not None:
                loaded.workers[label] = workers
    if not loaded.histories:
        raise ConfigError(f"run directory {str(run_dir)!r} holds no run histories (*/{HISTORY_FILE}); "
                          "expected a directory written by `unison compare`")
    return loaded


def _toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def summarise(loaded: Loaded) -> summaries.Summary:
    options = loaded.compare
    machine = options.get("machine", {})
    load = (machine["load_before"], machine["load_after"]) if {"load_before", "load_after"} <= set(machine) else None
    return summaries.summarise(loaded.histories, workers=loaded.workers, target=options.get("target"),
                               reference=options.get("reference"),
                               fraction=options.get("target_fraction", summaries.TARGET_FRACTION),
                               attempts=loaded.attempts, cores=machine.get("cores"), load=load,
                               link=options.get("link"))


def build(run_dir: str | Path) -> summaries.Summary:
    """Write summary.md, summary.csv, the plots and report.html into ``run_dir``."""
    run_dir = Path(run_dir)
    loaded = load(run_dir)
    summary = summarise(loaded)
    (run_dir / SUMMARY_MD).write_text(summaries.markdown(summary) + _skipped_markdown(loaded.skipped))
    (run_dir / SUMMARY_CSV).write_text(summaries.csv_text(summary))
    plots = write_plots(loaded.histories, summary, run_dir)
    (run_dir / REPORT_HTML).write_text(html_report(loaded, summary, {name: run_dir / name for name in plots}))
    return summary


def _skipped_markdown(skipped: dict[str, str]) -> str:
    if not skipped:
        return ""
    return "\nNot run:\n\n" + "".join(f"- {label}: {why}\n" for label, why in skipped.items())


# ---- plots -------------------------------------------------------------------------------------

def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure  # imported on demand: it takes half a second

    figure = Figure(figsize=(7, 4.2), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    return figure, axes


def _colours(labels) -> dict[str, str]:
    """One colour per run, the same in every plot."""
    palette = [f"C{i}" for i in range(10)]
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


def _log_time_axis(axes) -> None:
    """A log-scaled time axis labelled in plain seconds at 1, 2 and 5 of each decade; minor
    ticks unlabelled, so a narrow panel's labels do not run into each other."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes.set_xscale("log")
    axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.xaxis.set_minor_formatter(NullFormatter())


def _save(figure, path: Path) -> None:
    figure.savefig(path, format="png", metadata={"Software": None})  # same bytes for the same data


def write_plots(histories: dict[str, list[dict[str, Any]]], summary: summaries.Summary,
                out: Path) -> list[str]:
    """The four plots as PNG files in ``out``; returns their file names."""
    colours, metric = _colours(histories), summary.metric
    percent = summaries.higher_is_better(metric)
    scale = 100.0 if percent else 1.0
    name = "validation accuracy (%)" if percent else "validation loss"

    diverging = {row.label for row in summary.rows if row.diverging}
    first = "; first attempt" if any(row.attempts > 1 for row in summary.rows) else ""
    modelled = f"; dotted: {summaries.modelled_label(summary.link)}" if summary.link else ""
    figure, axes = _figure(f"{name.split(' (')[0].capitalize()} against wall time (start-up included{first}{modelled})",
                           "wall time (s, log scale)", name)
    for label, records in histories.items():
        points = [(r["wall_s"], r[metric] * scale) for r in records if r.get(metric) is not None]
        if points:
            axes.plot(*zip(*points), marker="o", markersize=3, color=colours[label],
                      label=_marked(label, diverging), linestyle="--" if label in diverging else "-")
            if label in diverging:
                axes.plot(*points[-1], marker="X", markersize=10, color=colours[label])
    if summary.link:  # the same curves re-timed on the modelled link, dotted
        for label, records in histories.items():
            row = next((r for r in summary.rows if r.label == label), None)
            walls = linkmodel.predict(records, (row.workers if row else None) or 1, linkmodel.parse(summary.link))
            points = [(w, r[metric] * scale) for w, r in zip(walls or [], records) if r.get(metric) is not None]
            if points:
                axes.plot(*zip(*points), marker=".", markersize=3, color=colours[label], linestyle=":",
                          label=f"{label}, {summaries.modelled_label(summary.link)}")
    if all(r["wall_s"] > 0 for records in histories.values() for r in records):
        _log_time_axis(axes)  # a fast run's rounds stay readable beside a slow run's
    if summary.target is not None:
        axes.axhline(summary.target * scale, color="grey", linestyle="--", linewidth=1,
                     label=f"target ({summary.target_note})")
    axes.legend(fontsize="small")
    _save(figure, out / time_plot_name(metric))

    figure, axes = _figure("Validation loss against epoch", "epoch", "validation loss")
    for label, records in histories.items():
        points = [(r["epoch"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        if points:
            axes.plot(*zip(*points), marker="o", markersize=3, label=_marked(label, diverging), color=colours[label],
                      linestyle="--" if label in diverging else "-")
    if all(r["val_loss"] > 0 for records in histories.values() for r in records if r.get("val_loss") is not None):
        axes.set_yscale("log")
    axes.legend(fontsize="small")
    _save(figure, out / LOSS_PLOT)

    figure, axes = _figure("Replica divergence before each merge", "round",
                           "mean distance of replicas to their mean")
    zero = []
    for label, records in histories.items():
        distances = [r.get("divergence", 0.0) for r in records]
        if not any(distances):
            zero.append(label)
            continue
        axes.plot(range(1, len(distances) + 1), distances, marker="o", markersize=3, label=label,
                  color=colours[label])
    if len(zero) < len(histories):
        axes.set_yscale("log")
        axes.legend(fontsize="small")
    if zero:
        note = textwrap.fill(f"zero throughout (replicas identical): {', '.join(zero)}", 90)  # many runs: lines
        axes.text(0.01, 0.01, note, transform=axes.transAxes, fontsize="small", color="grey", clip_on=True)
    _save(figure, out / DIVERGENCE_PLOT)

    figure, axes = _figure("Training throughput (start-up excluded)", "samples per second", "")
    labels = [row.label for row in summary.rows]
    rates = [row.samples_per_s for row in summary.rows]
    bars = axes.barh(labels, rates, color=[colours[label] for label in labels])
    axes.bar_label(bars, labels=[f"{rate:,.0f}" for rate in rates], padding=3, fontsize="small")
    axes.invert_yaxis()  # first run on top, as in the table
    axes.margins(x=0.15)
    _save(figure, out / THROUGHPUT_PLOT)
    _intervals_plot(summary, colours, out / INTERVALS_PLOT)
    return [time_plot_name(metric), INTERVALS_PLOT, LOSS_PLOT, DIVERGENCE_PLOT, THROUGHPUT_PLOT]


def _marked(label: str, diverging: set[str]) -> str:
    return f"{label} (diverging)" if label in diverging else label


def _intervals_plot(summary: summaries.Summary, colours: dict[str, str], path: Path) -> None:
    """Time to target (median, its spread as error bars, log scale) and the final metric (mean ±
    its 95% interval over seeds), one bar per run, first run on top."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 0.5 * len(summary.rows) + 1.8), dpi=100, layout="constrained")
    left, right = figure.subplots(1, 2, sharey=True)
    labels = [row.label + (" (diverging)" if row.diverging else "") for row in summary.rows]
    reached = [row for row in summary.rows if row.time_to_target_s is not None]
    for axes in (left, right):
        axes.grid(True, axis="x", alpha=0.3)
    for i, row in enumerate(summary.rows):
        colour = colours.get(row.label, "C0")
        if row.time_to_target_s is not None:
            low = row.time_to_target_s - (row.time_min_s if row.time_min_s is not None else row.time_to_target_s)
            high = (row.time_max_s if row.time_max_s is not None else row.time_to_target_s) - row.time_to_target_s
            left.errorbar(row.time_to_target_s, i, xerr=[[low], [high]], fmt="o", color=colour, capsize=4,
                          markersize=7)
        else:
            left.text(0.02, i, "not reached", transform=left.get_yaxis_transform(), va="center", color="grey",
                      fontsize="small")
    if reached:
        _log_time_axis(left)
    left.set_title("Time to target (s): median and spread over repeats", fontsize="medium")
    percent = summaries.higher_is_better(summary.metric)
    scale = 100.0 if percent else 1.0
    for i, row in enumerate(summary.rows):
        if row.final is not None:
            error = 0.0 if row.final_interval is None else row.final_interval * scale
            right.errorbar(row.final * scale, i, xerr=error, fmt="s", color=colours.get(row.label, "C0"), capsize=4,
                           markersize=7)
    right.set_title(f"Final validation {'accuracy (%)' if percent else 'loss'}: mean ± 95% interval",
                    fontsize="medium")
    left.set_yticks(range(len(labels)), labels)
    left.set_ylim(len(labels) - 0.5, -0.5)  # first run on top, as in the table
    _save(figure, path)


# ---- HTML --------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 76rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }
td { white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
.verdict { font-size: 1.1rem; background: #eef6ee; padding: 0.8rem 1rem; border-radius: 6px; }
img { max-width: 100%; height: auto; }
.table-wrap { overflow-x: auto; }
tr.winner td { background: #e3f2e1; font-weight: 600; }
tr.diverging td { background: #fbe9e7; color: #8a1c0b; }
.budget { background: #f6f6f6; padding: 0.6rem 1rem; border-radius: 6px; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2rem 1rem; }
dt { font-weight: 600; }
"""


def _markdown_bold(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))


def _settings_list(settings: dict[str, Any]) -> list[tuple[str, str]]:
    data, model, train = (settings.get(k, {}) for k in ("data", "model", "train"))
    compare = settings.get("compare", {})
    items = [("data", f"{data.get('dataset', '?')} (validation: {data.get('val_fraction', '?')} held out)")]
    if model:
        items.append(("model", f"MLP, hidden layers {model.get('hidden')}, {model.get('activation', 'relu')}"))
    elif compare.get("model"):
        items.append(("model", str(compare["model"])))
    if train:
        items.append(("training", ", ".join(f"{k}={v}" for k, v in train.items() if k != "timeout")))
    simulated = [label for label in compare.get("strategies", [])
                 if compare.get("runs", {}).get(label, {}).get("speeds")]
    if train.get("speeds") or simulated:
        items.append(("simulated speeds", "times are simulated: worker r waits so that its steps take "
                      "max(speeds)/speeds[r] times as long (declared speeds, one machine)"
                      + (f"; runs {', '.join(simulated)}" if simulated else "")))
    hosts = compare.get("hosts")
    if hosts:  # the runs were made on real hosts (unison.evidence.two_hosts), their times measured there
        items.append(("hosts", f"{hosts.get('count')} hosts × {hosts.get('processes_per_host')} process(es), "
                      f"link {hosts.get('link')} (network namespaces; times measured on that link)"))
    runs = compare.get("runs", {})
    if compare.get("strategies"):
        items.append(("runs", ", ".join(compare["strategies"])))
    for label in compare.get("strategies", []):
        extra = {k: v for k, v in runs.get(label, {}).items() if k not in ("dir", "strategy", "attempts")}
        if extra:  # a run with settings of its own
            extra = {"strategy": runs[label].get("strategy")} | extra
            items.append((f"run {label}", ", ".join(f"{k}={v}" for k, v in extra.items())))
    machine = compare.get("machine", {})
    budget = compare.get("budget", {})
    if budget:
        timed = budget.get("calibration_s", {})
        calibration = ", ".join(f"{k} thread(s) {v:.3f} s" for k, v in timed.items())
        items.append(("compute budget", f"{budget.get('rule')}; single: {budget.get('single_threads')} "
                      f"thread(s), {budget.get('single_threads_from')}" + (f" ({calibration})" if calibration else "")))
    if "repeat" in compare:
        items.append(("measurement", f"each run {compare['repeat']}× in interleaved order (A B C, C B A, ...) "
                      f"with {compare.get('seeds', 1)} seed(s); times: median (spread: {verdicts.SPREAD_RULE}); finals: mean ± 95% "
                      "Student t interval over seeds"))
    if machine.get("load_before") is not None:
        items.append(("machine load", f"1-minute load average {machine['load_before']} before, "
                      f"{machine.get('load_after')} after, on {machine.get('cores')} core(s)"))
    if machine:
        items.append(("machine", ", ".join(f"{k}: {v}" for k, v in machine.items() if not k.startswith("load_"))))
    return items


def html_report(loaded: Loaded, summary: summaries.Summary, plots: dict[str, Path]) -> str:
    """One HTML file with everything inline: settings, table, verdict, plots (base64 PNG)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in summaries.headers(summary))
    winner, _ = verdicts.lead(verdicts.on_link(summary.rows) if summary.link else summary.rows)

    def row_class(row: summaries.Row) -> str:
        name = "winner" if winner is not None and winner.label == row.label else "diverging" if row.diverging else ""
        return f' class="{name}"' if name else ""
    rows = "".join(f"<tr{row_class(row)}>" + "".join(f"<td>{html.escape(c)}</td>"
                                                     for c in summaries.cells(row, summary.metric, summary.link))
                   + "</tr>" for row in summary.rows)
    settings = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>"
                       for k, v in _settings_list(loaded.settings))
    skipped = "".join(f"<li>{html.escape(label)}: {html.escape(why)}</li>" for label, why in loaded.skipped.items())
    images = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode("ascii")}"></figure>' for name, path in plots.items())
    target = summaries.metric_text(summary.target, summary.metric)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>unison comparison</title>
<style>{_STYLE}</style></head><body>
<h1>unison comparison</h1>
<p class="verdict">{_markdown_bold(summaries.verdict(summary))}</p>
<h2>What was run</h2>
<p>The same model and data trained with each strategy (as often as the measurement line says),
one run after another on this machine.
Each run's merged model was evaluated on the validation set at every round end (a merge).</p>
<dl>{settings}</dl>
{f"<p>Not run:</p><ul>{skipped}</ul>" if skipped else ""}
<h2>Results</h2>
<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>
<p>Target: {html.escape(target)} ({html.escape(summary.target_note)}). Time to target is the wall time
from the start of a run, process start-up included, to the first round end at which the merged model
reached the target; speedup is {html.escape(str(summary.reference))}'s time divided by the run's.
The merged model is measured at round ends only (see the rounds column): a run with more rounds is
measured more often, and its time to target is found more precisely.
samples/s counts training samples of all workers per second after start-up; comm MB/worker is what
each worker sent (ring all-reduce accounting).
With several attempts a time is the median with its spread ({verdicts.SPREAD_RULE}) and a final value the mean over
seeds ± the half-width of its 95% Student t interval; the winner's row is highlighted only when its lead
holds across repeats, and a diverging run (validation loss well above its best) is marked.</p>
{f"<p>{html.escape(summaries.link_note(summary.link))} The highlighted winner is the one on that link.</p>"
 if summary.link else ""}
<h2>Plots</h2>
{images}
</body></html>
"""
