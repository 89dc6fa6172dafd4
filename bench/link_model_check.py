"""The link model (unison.linkmodel) against measurement: predicted vs measured time per epoch.

For every run on a throttled link in bench/link.py's JSON (2 hosts in network namespaces, tc
tbf at a rate, torchrun), the run of the same model and strategy on the unthrottled veth link
(rate "veth") is the baseline: its records give each round's compute (wall − the seconds inside
collectives) and its counted collectives. The prediction on rate R is that compute plus the
collectives timed at R (unison.linkmodel), with a per-message cost α:

- α calibrated: tbf adds no latency (netem is not in these kernels), but every message costs
  gloo and the kernel something; α = (the baseline's seconds in collectives − its bytes at the
  veth rate) / its latency terms, i.e. the per-step cost the unthrottled link showed;
- α = 0: the bare link spec "R" (what `unison compare --link R` would model).

The error is (predicted − measured) / measured; above 25% is flagged. Figures: measured (the
throttled runs' s/epoch, as bench/link.py reads them) and modelled (the predictions).

The JSON (bench/link.py --json, or anything in its form): {"runs": [{"model": str, "strategy":
spec, "rate": "veth" | tc rate such as "100mbit", "hosts": 2, "processes_per_host": 1,
"s_per_epoch": float | null, "records": [rank 0's history records, with comm_s and collectives],
optional "measured_mbit", "capped", "comm_bytes", "epochs_done"}, ...]}. ``--baseline FILE`` takes
the baselines from another file of that form (e.g. a loopback run), its rate from ``--baseline-rate``.

    python bench/link.py --json link.json           # as root, on a quiet machine
    python bench/link_model_check.py link.json [--threshold 0.25] [--baseline other.json]

It predicts and prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from unison import linkmodel

THRESHOLD = 0.25
UNTHROTTLED = ("veth", "none", "unlimited", "loopback", None)


def _world(run: dict) -> int:
    return int(run.get("hosts", 2)) * int(run.get("processes_per_host", 1))


def _terms(records: list[dict], world: int) -> tuple[float, float, float]:
    """(latency terms, bytes terms, seconds in collectives) of a run's records."""
    a = b = spent = 0.0
    for record in records:
        for table in (record.get("collectives"), record.get("bookkeeping")):
            da, db = linkmodel.collectives_terms(table, world)
            a, b = a + da, b + db
        spent += float(record.get("comm_s", 0.0))
    return a, b, spent


def calibrated_latency(records: list[dict], world: int, rate_bits: float) -> float:
    """The per-message cost α that the baseline showed: its seconds inside collectives less its
    bytes at ``rate_bits`` (math.inf: none), per latency term; 0 if it sent nothing."""
    a, b, spent = _terms(records, world)
    if a <= 0:
        return 0.0
    wire = 0.0 if math.isinf(rate_bits) else b / linkmodel.Link(rate_bits).payload_bytes_per_s
    return max(spent - wire, 0.0) / a


def predicted_epoch(records: list[dict], world: int, link: linkmodel.Link) -> float | None:
    return linkmodel.epoch_seconds(records, linkmodel.predict(records, world, link))


def _rate_bits(run: dict, fallback: float) -> float:
    measured = run.get("measured_mbit")
    return float(measured) * 1e6 if measured else fallback


def check(runs: list[dict], baselines: list[dict], threshold: float, baseline_rate: float) -> list[dict]:
    """One row per throttled run: measured and predicted s/epoch and the errors."""
    base = {(r.get("model"), r["strategy"]): r for r in baselines if r.get("rate") in UNTHROTTLED}
    rows = []
    for run in runs:
        if run.get("rate") in UNTHROTTLED:
            continue
        row = {"model": run.get("model"), "strategy": run["strategy"], "rate": run["rate"],
               "measured_s": run.get("s_per_epoch"), "capped": bool(run.get("capped"))}
        baseline = base.get((run.get("model"), run["strategy"]))
        records = (baseline or {}).get("records") or []
        if not linkmodel.modelled(records):
            rows.append(row | {"note": "no baseline with counted collectives (rate veth, same model and strategy)"})
            continue
        world = _world(baseline) - (1 if linkmodel.asynchronous(records) else 0)  # fedbuff: its server rank
        alpha = calibrated_latency(records, world, _rate_bits(baseline, baseline_rate))
        bits = linkmodel.parse(run["rate"], field="rate").bits_per_s
        row |= {"alpha_us": alpha * 1e6,
                "predicted_s": predicted_epoch(records, world, linkmodel.Link(bits, alpha)),
                "bare_s": predicted_epoch(records, world, linkmodel.Link(bits)),
                "baseline_s": linkmodel.epoch_seconds(records)}
        if row["measured_s"]:
            for key in ("predicted", "bare"):
                row[f"{key}_error"] = row[f"{key}_s"] / row["measured_s"] - 1.0
            row["flag"] = abs(row["predicted_error"]) > threshold
        sent, their = run.get("comm_bytes"), run.get("epochs_done")
        if sent and their and baseline.get("comm_bytes") and baseline.get("epochs_done"):
            ratio = (sent / their) / (baseline["comm_bytes"] / baseline["epochs_done"])
            if abs(ratio - 1) > 0.02:
                row["note"] = f"bytes per epoch differ from the baseline's by {ratio - 1:+.0%}"
        rows.append(row)
    return rows


def _cell(value, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def markdown(rows: list[dict], threshold: float) -> str:
    head = ("| model | strategy | link | measured s/epoch | modelled s/epoch (α calibrated) | error | "
            "α (µs) | modelled s/epoch (α = 0) | error | unthrottled s/epoch | > {:.0%} |".format(threshold))
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([
            str(r["model"]), f"`{r['strategy']}`", r["rate"] + (" (capped)" if r["capped"] else ""),
            _cell(r["measured_s"], "{:.3f}"), _cell(r.get("predicted_s"), "{:.3f}"),
            _cell(r.get("predicted_error"), "{:+.1%}"), _cell(r.get("alpha_us"), "{:.0f}"),
            _cell(r.get("bare_s"), "{:.3f}"), _cell(r.get("bare_error"), "{:+.1%}"),
            _cell(r.get("baseline_s"), "{:.3f}"),
            ("**yes**" if r.get("flag") else "no") if "flag" in r else r.get("note", "—")]) + " |")
    judged = [r for r in rows if "flag" in r]
    if judged:
        worst = max(judged, key=lambda r: abs(r["predicted_error"]))
        lines += ["", f"{sum(r['flag'] for r in judged)} of {len(judged)} predictions off by more than "
                      f"{threshold:.0%}; the largest error {worst['predicted_error']:+.1%} "
                      f"(`{worst['strategy']}` on {worst['rate']}). Measured: the throttled runs' time per "
                      "epoch; modelled: the unthrottled run's compute plus its collectives timed on the link."]
    notes = [f"- `{r['strategy']}` on {r['rate']}: {r['note']}" for r in rows if r.get("note") and "flag" in r]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measured", type=Path, help="bench/link.py's JSON (--json)")
    parser.add_argument("--baseline", type=Path, help="take the unthrottled runs from this JSON instead")
    parser.add_argument("--baseline-rate", default=None,
                        help="the baseline link's rate when its runs carry no measured_mbit (default: infinite)")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help="flag errors above this (default 0.25)")
    args = parser.parse_args(argv)
    runs = json.loads(args.measured.read_text())["runs"]
    baselines = json.loads(args.baseline.read_text())["runs"] if args.baseline else runs
    if args.baseline:  # every run there is a baseline
        baselines = [r | {"rate": "veth"} for r in baselines]
    rate = math.inf if args.baseline_rate is None else linkmodel.parse(args.baseline_rate, "--baseline-rate").bits_per_s
    rows = check(runs, baselines, args.threshold, rate)
    if not rows:
        print("link_model_check: no throttled runs in the file", file=sys.stderr)
        return 1
    print(markdown(rows, args.threshold), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
