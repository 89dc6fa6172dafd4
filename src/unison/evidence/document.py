"""The evidence document and plots: one section per experiment, written from its results."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from ..verdict import mean_interval

DOCUMENT, PLOT = "evidence.md", "findings.png"


def _number(value: float | None, percent: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.1%}" if percent else f"{value:.3g}"


def _mean_text(values: Sequence[float], percent: bool) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "not reached"
    mean, half = mean_interval(finite)
    text = _number(mean, percent) + ("" if half is None else f" ± {_number(half, percent)}")
    return text + (f" ({len(finite)} of {len(values)} seeds)" if len(finite) < len(values) else "")


def plot(findings: Sequence[Any], verdicts: Sequence[Any], path: Path) -> None:
    """One panel per finding: each arm's mean with its 95% interval, and every seed's values
    joined by a grey line (the arms of a seed share its split and start: the effect is paired)."""
    from matplotlib.figure import Figure  # on demand: it takes half a second

    columns = min(2, len(findings))
    rows = math.ceil(len(findings) / columns)
    figure = Figure(figsize=(6.4 * columns, 3.6 * rows), dpi=100, layout="constrained")
    for index, (finding, verdict) in enumerate(zip(findings, verdicts)):
        axes = figure.add_subplot(rows, columns, index + 1)
        labels = list(finding.arms)
        for seed_values in zip(*finding.arms.values()):
            axes.plot(range(len(labels)), seed_values, "o-", color="0.7", markersize=3, linewidth=0.8, zorder=2)
        for x, label in enumerate(labels):
            seeds = [v for v in finding.arms[label] if math.isfinite(v)]
            if seeds:
                mean, half = mean_interval(seeds)
                axes.errorbar([x], [mean], yerr=[[half or 0.0]], fmt="o", color="C0", capsize=4, zorder=3)
        axes.set_xticks(range(len(labels)), labels, rotation=20 if max(map(len, labels), default=0) > 8 else 0,
                        ha="right" if max(map(len, labels), default=0) > 8 else "center", fontsize=8)
        axes.set_xlim(-0.5, len(labels) - 0.5)
        axes.set_ylabel(finding.metric, fontsize=8)
        axes.set_title(f"{verdict.verdict}: {_short(finding.claim)}", fontsize=9)
        axes.grid(True, axis="y", alpha=0.3)
    figure.savefig(path, format="png", metadata={"Software": None})


def _short(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[:width - 1].rstrip() + "…"


def markdown(results: Sequence[tuple[Any, dict[str, Any]]], out: Path, doc_dir: Path) -> str:
    """The document: a summary table, then one section per experiment."""
    lines = ["# Evidence: published findings, reproduced in direction", "",
             "Written by `unison reproduce` (do not edit by hand). Each finding is judged over seeds: "
             "**reproduced** when the published direction holds in at least 4 of 5 seeds (3 of 3), "
             "**not reproduced** when the opposite holds as often, else **inconclusive**. Effects are means "
             "± the half-width of a 95% Student t interval over the seeds. Small data and small models are not "
             "the papers' settings: each section says why its result may differ.", "",
             "| experiment | paper | verdict | took |", "|---|---|---|---:|"]
    for spec, result in results:
        quick = " (--quick)" if result["quick"] else ""
        lines.append(f"| [{spec.name}](#{spec.name}) | {spec.paper.split(',')[0]} | "
                     f"{_verdicts_line(result)} | {result['elapsed_s'] / 60:.1f} min{quick} |")
    for spec, result in results:
        lines += [""] + section(spec, result, out, doc_dir)
    return "\n".join(lines) + "\n"


def _verdicts_line(result: dict[str, Any]) -> str:
    verdicts = [v["verdict"] for v in result["verdicts"]]
    head = f"**{verdicts[0]}**"
    rest = verdicts[1:]
    return head + (f" (+ {len(rest)} more: {', '.join(rest)})" if rest else "")


def section(spec: Any, result: dict[str, Any], out: Path, doc_dir: Path) -> list[str]:
    folder = out / spec.name
    seeds = result["seeds"]
    quick = result["quick"]
    command = f"unison reproduce {spec.name}{' --quick' if quick else ''}"
    lines = [f"## {spec.name}", "", f"*{spec.paper}*", "", f"**Claim.** {spec.claim}", "",
             f"**The paper's figure.** {spec.paper_figure}", "", f"**What unison runs.** {spec.setup}"]
    if quick and spec.quick_note:
        lines += ["", f"*--quick:* {spec.quick_note}"]
    lines += ["", f"**Verdict: {result['verdicts'][0]['verdict']}** (on the first finding below; seeds "
                  f"{seeds[0]}–{seeds[-1]}).", ""]
    for number, (finding, verdict) in enumerate(zip(result["findings"], result["verdicts"]), start=1):
        percent = finding["percent"]
        lines += [f"{number}. *{finding['claim']}* — **{verdict['verdict']}**: the direction held in "
                  f"{verdict['holds']} of {verdict['seeds']} seeds; {finding['effect']}: "
                  f"{_mean_text(finding['effects'], percent)} (threshold {_number(finding['threshold'], percent)}).",
                  "", f"   | arm | {finding['metric']} |", "   |---|---:|"]
        lines += [f"   | {label} | {_mean_text(values, percent)} |" for label, values in finding["arms"].items()]
        lines.append("")
    plot_path = Path(os.path.relpath(folder / PLOT, doc_dir)).as_posix()
    lines += [f"![{spec.name}: each arm's mean, its 95% interval and every seed]({plot_path})", "",
              f"**Why it may differ.** {spec.caveat}", "",
              f"**Command.** `{command}` — {result['elapsed_s'] / 60:.1f} min on {result['cores']} cores "
              f"({result['machine']}, {result['date']}); the comparisons behind it, each with its report.html: "
              + ", ".join(f"`{spec.name}/{part}`" for part in result["parts"]) + "."]
    return lines
