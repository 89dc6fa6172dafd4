"""Throughput at 1, 2 and 4 workers, and the efficiency against linear scaling.

unison ``periodic(every=epoch)`` on ``processes`` (one worker runs in-process), the issue 6
workload, no evaluation. Throughput is samples per second of training (wall time less
start-up), summed over workers; efficiency = throughput(N) / (N · throughput(1)).

    .venv/bin/python bench/scaling.py [--quick] [--rows 100000] [--epochs 2] [--strategy S]

It measures and prints; it asserts nothing. Results go into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse

import unison
from workload import BATCH, LR, MOMENTUM, dataset, machine, model, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 rows, 1 epoch")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--strategy", default="periodic(every=epoch)")
    parser.add_argument("--workers", default="1,2,4")
    args = parser.parse_args()
    rows, epochs = (20_000, 1) if args.quick else (args.rows, args.epochs)
    x, y, _, _ = dataset(rows, 1000)
    print(f"# scaling — {rows:,} rows, {args.strategy}, {epochs} epoch(s)\n# {machine()}\n", flush=True)
    out = []
    for workers in (int(w) for w in args.workers.split(",")):
        result = unison.fit(model, (x, y), val=None, strategy=args.strategy, workers=workers, backend="processes",
                            epochs=epochs, batch_size=BATCH, lr=LR, momentum=MOMENTUM, progress=False)
        samples_s = result.final["samples"] / (result.wall_s - result.startup_s)
        out.append({"workers": workers, "startup_s": result.startup_s, "samples_s": samples_s})
        print(f"  {out[-1]}", flush=True)
    for row in out:
        row["speedup"] = row["samples_s"] / out[0]["samples_s"]
        row["efficiency"] = row["speedup"] / (row["workers"] / out[0]["workers"])
    print()
    print(table(out, [("workers", "{}"), ("startup_s", "{:.2f}"), ("samples_s", "{:,.0f}"),
                      ("speedup", "{:.2f}×"), ("efficiency", "{:.0%}")]))


if __name__ == "__main__":
    main()
