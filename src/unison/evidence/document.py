"""The evidence document and plots: one section per experiment, written from its saved results
(finding.json, unison.evidence.reproduce), so a section says what was run when it was run."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..verdict import mean_interval
from .judge import HOLDS_FRACTION, needed

if TYPE_CHECKING:
    from .base import Finding
    from .judge import Verdict

DOCUMENT, PLOT = "evidence.md", "findings.png"
DEFAULT_OUT = Path("runs") / "evidence"   # where results go without --out
HEADING = "# Evidence: published findings, reproduced in direction"


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _number(value: float | None, percent: bool = False, unit: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "—"
    if percent:
        return f"{value:.1%}"
    if unit == "pp":
        return f"{value * 100:+.1f} pp"
    if unit == "%":
        return f"{value * 100:+.0f}%"
    return f"{value:.3g}"


def _half(half: float, percent: bool, unit: str) -> str:
    if percent:
        return f"{half:.1%}"
    return {"pp": f"{half * 100:.1f} pp", "%": f"{half * 100:.0f}%"}.get(unit, f"{half:.3g}")


def mean_text(values: Sequence[float | None], percent: bool = False, unit: str = "") -> str:
    finite = _finite(values)
    if not finite:
        return "none (every seed missed)" if values else "—"
    mean, half = mean_interval(finite)
    text = _number(mean, percent, unit) + ("" if half is None else f" ± {_half(half, percent, unit)}")
    return text + (f" ({len(finite)} of {len(values)} seeds; the others missed)" if len(finite) < len(values) else "")


def plot(findings: Sequence["Finding"], verdicts: Sequence["Verdict"], path: Path) -> None:
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
            seeds = _finite(finding.arms[label])
            if seeds:
                mean, half = mean_interval(seeds)
                axes.errorbar([x], [mean], yerr=[[half or 0.0]], fmt="o", color="C0", capsize=4, zorder=3)
        long = max(map(len, labels), default=0) > 8
        axes.set_xticks(range(len(labels)), labels, rotation=20 if long else 0, ha="right" if long else "center",
                        fontsize=8)
        axes.set_xlim(-0.5, len(labels) - 0.5)
        axes.set_ylabel(finding.metric, fontsize=8)
        axes.set_title(f"{verdict.verdict} ({verdict.holds}/{verdict.seeds}): {_short(finding.claim)}", fontsize=9)
        axes.grid(True, axis="y", alpha=0.3)
    figure.savefig(path, format="png", metadata={"Software": None})


def _short(text: str, width: int = 64) -> str:
    return text if len(text) <= width else text[:width - 1].rstrip() + "…"


def command(result: dict[str, Any]) -> str:
    """The command that reruns this result as it was run."""
    seeds = result["seeds"]
    flags = " --quick" if result["quick"] else ""
    if len(seeds) != result.get("default_seeds", len(seeds)):
        flags += f" --seeds {len(seeds)}"
    if result.get("out") and Path(result["out"]) != DEFAULT_OUT:
        flags += f" --out {result['out']}"
    return f"unison reproduce {result['name']}{flags}"


def markdown(results: Sequence[dict[str, Any]], out: Path, doc_dir: Path) -> str:
    """The document: every finding's verdict in one table, then one section per experiment."""
    lines = [HEADING, "",
             "Written by `unison reproduce` from the results it saved (do not edit by hand). Each finding is "
             f"judged over seeds, each seed giving every arm the same split and start: **reproduced** when the "
             f"published direction holds in at least {HOLDS_FRACTION:.0%} of the seeds (4 of 5, 3 of 3), "
             "**not reproduced** when it fails (ties included) in as many, else **inconclusive**. That is a check "
             "that the sign is consistent, not a significance test: read it with the effect's size and its "
             "interval (mean ± the half-width of a 95% Student t interval over the seeds). Small data and small "
             "models are not the papers' settings: each section says why its result may differ.", "",
             "| experiment | finding | verdict | effect |", "|---|---|---|---|"]
    for result in results:
        name = result["name"]
        for finding, verdict in zip(result["findings"], result["verdicts"]):
            quick = ", --quick" if result["quick"] else ""
            lines.append(f"| [{name}](#{name}) | {finding['claim']} | **{verdict['verdict']}** "
                         f"({verdict['holds']} of {verdict['seeds']}{quick}) | "
                         f"{mean_text(finding['effects'], unit=finding.get('effect_unit', ''))} "
                         f"(claim: > {_number(finding['threshold'], unit=finding.get('effect_unit', ''))}) |")
    for result in results:
        lines += [""] + section(result, out, doc_dir)
    return "\n".join(lines) + "\n"


def section(result: dict[str, Any], out: Path, doc_dir: Path) -> list[str]:
    """One experiment's section: the claim, the paper's figure, what ran, each finding, the plot."""
    name, text, seeds = result["name"], result["text"], result["seeds"]
    folder = out / name
    lines = [f"## {name}", "", f"*{text['paper']}*", "", f"**Claim.** {text['claim']}", "",
             f"**The paper's figure.** {text['paper_figure']}", "", f"**What unison runs.** {text['setup']}"]
    if result["quick"] and text.get("quick_note"):
        lines += ["", f"*--quick:* {text['quick_note']}"]
    reproduced = sum(v["verdict"] == "reproduced" for v in result["verdicts"])
    lines += ["", f"**Findings** ({reproduced} of {len(result['verdicts'])} reproduced; seeds "
                  f"{seeds[0]}–{seeds[-1]}):", ""]
    for number, (finding, verdict) in enumerate(zip(result["findings"], result["verdicts"]), start=1):
        unit = finding.get("effect_unit", "")
        missed = f", {verdict['missed']} without an effect" if verdict.get("missed") else ""
        lines += [f"{number}. *{finding['claim']}* — **{verdict['verdict']}**: the direction held in "
                  f"{verdict['holds']} of {verdict['seeds']} seeds ({needed(verdict['seeds'])} needed{missed}); {finding['effect']}: "
                  f"{mean_text(finding['effects'], unit=unit)} (the direction: above "
                  f"{_number(finding['threshold'], unit=unit)}).",
                  "", f"   | arm | {finding['metric']} |", "   |---|---:|"]
        lines += [f"   | {label} | {mean_text(values, finding['percent'])} |"
                  for label, values in finding["arms"].items()]
        lines.append("")
    if result.get("loaded"):
        lines += [f"**Warning:** {result['loaded']}.", ""]
    lines += [item for note in result.get("notes", []) for item in (f"**Note.** {note}", "")]
    relative = Path(os.path.relpath(folder, doc_dir)).as_posix()
    lines += [f"![{name}: each arm's mean, its 95% interval and every seed]({relative}/{PLOT})", "",
              f"**Why it may differ.** {text['caveat']}", "",
              f"**Command.** `{command(result)}` — {result['elapsed_s'] / 60:.1f} min on {result['cores']} cores "
              f"({result['machine']}, unison {result.get('unison', '?')}, {result['date']}). The comparisons behind "
              "it, each with its summary and report.html, are written beside the results (`make evidence` keeps "
              "them out of git): "
              + ", ".join(f"`{relative}/{part}`" for part in result["parts"]) + "."]
    return lines
