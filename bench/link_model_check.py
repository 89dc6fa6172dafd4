"""The link model (unison.linkmodel) against measurement: predicted vs measured time per epoch.

For every run on a throttled link in bench/link.py's JSON (2 hosts in network namespaces, tc
tbf at a rate, torchrun), the run of the same model and strategy on the unthrottled veth link
(rate "veth") is the baseline: its records give each round's compute (wall − the seconds inside
collectives) and its counted collectives. The prediction on rate R is that compute plus the
collectives timed at R (unison.linkmodel), α = 0 (tbf adds no latency; netem is not in these
kernels), two ways:

- modelled: what `unison compare --link R` predicts, each collective no faster than the
  baseline's round took a collective on average (linkmodel's floor: on this VM, over veth,
  all-reduces back to back take 2.3-3.7 ms each at the median from 8 KB to 1.36 MB, the waiting
  threads woken; bench/collectives.py);
- bare: the bytes at R alone (``floor=False``), the model before 2026-12-03's second look.

(Until then a third column calibrated a per-message α from the baseline; it did worse than
either, 16 of 24 within 25% against the bare model's 20, and is gone.)

The error is (predicted − measured) / measured; the modelled one above 25% is flagged. Figures:
measured (the throttled runs' s/epoch, as bench/link.py reads them) and modelled (predictions).

The JSON (bench/link.py --json, or anything in its form): {"runs": [{"model": str, "strategy":
spec, "rate": "veth" | tc rate such as "100mbit", "hosts": 2, "processes_per_host": 1,
"s_per_epoch": float | null, "records": [rank 0's history records, with comm_s and collectives],
optional "measured_mbit", "capped", "comm_bytes", "epochs_done"}, ...]}. ``--baseline FILE`` takes
the baselines from another file of that form (e.g. a loopback run).

    python bench/link.py --json link.json           # as root, on a quiet machine
    python bench/link_model_check.py link.json [--threshold 0.25] [--baseline other.json]

It predicts and prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unison import linkmodel

THRESHOLD = 0.25
UNTHROTTLED = ("veth", "none", "unlimited", "loopback", None)


def _world(run: dict) -> int:
    return int(run.get("hosts", 2)) * int(run.get("processes_per_host", 1))


def per_call_ms(records: list[dict]) -> float | None:
    """The baseline's mean milliseconds a collective (its comm_s over all its calls); None
    without collectives (fedbuff's rounds are messages)."""
    made = sum(linkmodel.calls(r) for r in records)
    return 1e3 * sum(float(r["comm_s"]) for r in records) / made if made else None


def per_epoch(records: list[dict], walls: list[float] | None, rounds: int | None = None) -> float | None:
    """Seconds per epoch as bench/link.py reads a run: start-up to the last round, or, for a run
    stopped after ``rounds`` rounds (or a baseline without start-up, itself stopped), from the
    first to the last of those rounds (the first, with its warm-up, then falls outside)."""
    walls = [float(r["wall_s"]) for r in records] if walls is None else walls
    if rounds is None and "startup_s" in records[-1]:
        return linkmodel.epoch_seconds(records, walls)
    k = min(len(records), rounds or len(records))
    if k < 2:
        return None
    return (walls[k - 1] - walls[0]) / (float(records[k - 1]["epoch"]) - float(records[0]["epoch"]))


def predicted_epoch(records: list[dict], world: int, link: linkmodel.Link, floor: bool = True,
                    rounds: int | None = None) -> float | None:
    walls = linkmodel.predict(records, world, link, floor)
    return None if walls is None else per_epoch(records, walls, rounds)


def check(runs: list[dict], baselines: list[dict], threshold: float) -> list[dict]:
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
        bits = linkmodel.parse(run["rate"], field="rate").bits_per_s
        # a stopped run is read from its first to its last round: the same rounds of the baseline
        rounds = (len(run.get("records") or []) or None) if run.get("s_per_epoch_from") == "first to last round" else None
        row |= {"per_call_ms": per_call_ms(records),
                "predicted_s": predicted_epoch(records, world, linkmodel.Link(bits), rounds=rounds),
                "bare_s": predicted_epoch(records, world, linkmodel.Link(bits), floor=False, rounds=rounds),
                "baseline_s": per_epoch(records, None, rounds)}
        if row["measured_s"] and row["predicted_s"] is not None and row["bare_s"] is not None:
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
    head = ("| model | strategy | link | measured s/epoch | modelled s/epoch | error | "
            "baseline ms a collective | bare s/epoch (bytes only) | error | unthrottled s/epoch | > {:.0%} |".format(threshold))
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([
            str(r["model"]), f"`{r['strategy']}`", r["rate"] + (" (capped)" if r["capped"] else ""),
            _cell(r["measured_s"], "{:.3f}"), _cell(r.get("predicted_s"), "{:.3f}"),
            _cell(r.get("predicted_error"), "{:+.1%}"), _cell(r.get("per_call_ms"), "{:.2f}"),
            _cell(r.get("bare_s"), "{:.3f}"), _cell(r.get("bare_error"), "{:+.1%}"),
            _cell(r.get("baseline_s"), "{:.3f}"),
            ("**yes**" if r.get("flag") else "no") if "flag" in r else r.get("note", "—")]) + " |")
    judged = [r for r in rows if "flag" in r]
    if judged:
        worst = max(judged, key=lambda r: abs(r["predicted_error"]))
        lines += ["", f"{sum(r['flag'] for r in judged)} of {len(judged)} predictions off by more than "
                      f"{threshold:.0%}; the largest error {worst['predicted_error']:+.1%} "
                      f"(`{worst['strategy']}` on {worst['rate']}). Measured: the throttled runs' time per "
                      "epoch; modelled: the unthrottled run's compute plus its collectives timed on the link, none "
                      "faster than the unthrottled run's; bare: the bytes alone."]
        bare = [r for r in judged if r.get("bare_error") is not None]
        lines += [f"Bare: {sum(abs(r['bare_error']) > threshold for r in bare)} of {len(bare)} off by more than "
                  f"{threshold:.0%}."]
    notes = [f"- `{r['strategy']}` on {r['rate']}: {r['note']}" for r in rows if r.get("note") and "flag" in r]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measured", type=Path, help="bench/link.py's JSON (--json)")
    parser.add_argument("--baseline", type=Path, help="take the unthrottled runs from this JSON instead")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help="flag errors above this (default 0.25)")
    args = parser.parse_args(argv)
    runs = json.loads(args.measured.read_text())["runs"]
    baselines = json.loads(args.baseline.read_text())["runs"] if args.baseline else runs
    if args.baseline:  # every run there is a baseline
        baselines = [r | {"rate": "veth"} for r in baselines]
    rows = check(runs, baselines, args.threshold)
    if not rows:
        print("link_model_check: no throttled runs in the file", file=sys.stderr)
        return 1
    print(markdown(rows, args.threshold), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
