"""unison's overhead against the same algorithm written by hand with torch.distributed.

- ``sync`` against raw DistributedDataParallel (gradients averaged every step);
- ``periodic(every=H)`` and ``periodic(every=epoch)`` against a hand-written loop that averages
  the parameters (one flat all-reduce) every H steps or each epoch.

Both sides: 2 processes on gloo, the issue 6 workload (MLP 64-256-256-10, SGD lr 0.01
momentum 0.9, batch 64), no evaluation. The figure compared is the time per epoch after the
first (start-up and warm-up excluded), as samples per second per worker, and its ratio. Each
pair runs ``--repeat`` times, alternating, and each side keeps its fastest run: on a shared
machine a single run moves by several percent.

    .venv/bin/python bench/overhead.py [--quick] [--rows 100000] [--epochs 3] [--repeat 3]

It measures and prints; it asserts nothing. Results go into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse

import unison
from workload import BATCH, LR, MOMENTUM, dataset, machine, model, multiprocess_loop, table

PAIRS = [("sync", None), ("periodic(every=16)", 16), ("periodic(every=epoch)", "epoch")]


def steady_epoch_s(records: list[dict]) -> float:
    """Seconds per epoch from the first record at or after epoch 1 to the last one."""
    first = next(r for r in records if r["epoch"] >= 1)
    last = records[-1]
    return (last["wall_s"] - first["wall_s"]) / (last["epoch"] - first["epoch"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 rows, 2 epochs")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows, epochs = (20_000, 2) if args.quick else (args.rows, args.epochs)
    x, y, _, _ = dataset(rows, 1000)
    per_worker = rows // args.workers // BATCH * BATCH
    print(f"# overhead — {rows:,} rows, {args.workers} processes, {epochs} epochs\n# {machine()}\n", flush=True)
    out = []
    for strategy, every in PAIRS:
        hand_s = ours_s = float("inf")
        for _ in range(1 if args.quick else args.repeat):
            by_hand = multiprocess_loop(x, y, None, None, workers=args.workers, epochs=epochs, average_every=every)
            ours = unison.fit(model, (x, y), val=None, strategy=strategy, workers=args.workers, backend="processes",
                              epochs=epochs, batch_size=BATCH, lr=LR, momentum=MOMENTUM, progress=False)
            hand_s = min(hand_s, steady_epoch_s(by_hand["records"]))
            ours_s = min(ours_s, steady_epoch_s(ours.history))
        baseline = "raw DDP" if every is None else f"hand-written averaging every {every}"
        out.append({"unison": strategy, "baseline": baseline, "baseline_samples_s": per_worker / hand_s,
                    "unison_samples_s": per_worker / ours_s, "ratio": ours_s / hand_s})
        print(f"  {out[-1]}", flush=True)
    print()
    print(table(out, [("unison", "{}"), ("baseline", "{}"), ("baseline_samples_s", "{:,.0f}"),
                      ("unison_samples_s", "{:,.0f}"), ("ratio", "{:.3f}×")]))
    print("\nsamples/s are per worker; ratio = unison's time per epoch / the baseline's (lower is better).")


if __name__ == "__main__":
    main()
