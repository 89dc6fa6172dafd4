"""Uneven workers (issue 15): time to a target accuracy with one slow worker, simulated.

Four workers on ``processes`` with declared speeds [1, 1, 1, 0.25] (the slow one waits out 3×
its measured step time; unison.engine.pace), against the same run waiting for the slow worker:

- ``periodic`` rounds of H steps (and of an epoch), every worker waiting for the slowest;
- ``balance="speed"``: shares and batches ∝ speed (unison.balance, LB-BSP);
- ``min_fraction=0.75``: a round closes when 3 of 4 workers finished it (FedAvg's partial
  participation), the straggler left out of its merges; ``deadline=0``: as soon as one did;
- ``fedbuff(every=H, buffer=2)``: asynchronous, no worker waits for another (a fifth rank serves);
- ``sync`` with and without balance, for reference.

Every method is evaluated at round ends; its time to target is the wall time (start-up
included) of the first record at or above it. The ratio column is the waiting ``periodic``'s
time over the method's (the issue's target: the best of balanced shards, deadline rounds and
async >= 1.8×, final accuracy within 1 point). Times are SIMULATED slowness on one
machine. One untimed run first, so that no method pays the workers' first start.

    .venv/bin/python bench/uneven.py [--quick] [--epochs 6] [--target 0.9] [--speeds 1,1,1,0.25]

It measures and prints; it asserts nothing. Results go into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse

import unison
from workload import BATCH, LR, MOMENTUM, dataset, machine, model, table, time_to


def methods(every: int, workers: int) -> list[tuple[str, dict]]:
    """(label, fit() settings) of each method; the first is the reference (waits for the slowest)."""
    quorum = (workers - 1) / workers
    return [
        (f"periodic(every={every}), waiting", {"strategy": f"periodic(every={every})"}),
        (f"periodic(every={every}), balance=speed", {"strategy": f"periodic(every={every})", "balance": "speed"}),
        (f"periodic(every={every}, min_fraction={quorum:g})",
         {"strategy": f"periodic(every={every}, min_fraction={quorum:g})"}),
        (f"periodic(every={every}, deadline=0)", {"strategy": f"periodic(every={every}, deadline=0)"}),
        ("periodic(every=epoch), waiting", {"strategy": "periodic(every=epoch)"}),
        ("periodic(every=epoch), balance=speed", {"strategy": "periodic(every=epoch)", "balance": "speed"}),
        (f"periodic(every=epoch, min_fraction={quorum:g})",
         {"strategy": f"periodic(every=epoch, min_fraction={quorum:g})"}),
        ("sync, waiting", {"strategy": "sync"}),
        ("sync, balance=speed", {"strategy": "sync", "balance": "speed"}),
        (f"fedbuff(every={every}, buffer=2)", {"strategy": f"fedbuff(every={every}, buffer=2)"}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8,000 rows, 1 epoch: a smoke test")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--speeds", default="1,1,1,0.25", help="one relative speed per worker")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds-per-epoch", type=int, default=8, help="H = a worker's epoch / this")
    args = parser.parse_args()
    unison.prestart()
    speeds = [float(s) for s in args.speeds.split(",")]
    workers = len(speeds)
    train, test, epochs = (8_000, 2_000, 1) if args.quick else (args.rows, 20_000, args.epochs)
    x, y, x_test, y_test = dataset(train, test)
    every = max(1, train // workers // BATCH // args.rounds_per_epoch)
    print(f"# uneven workers: speeds {speeds} (SIMULATED by waiting), {train:,} rows, MLP 64-256-256-10, SGD lr "
          f"{LR} momentum {MOMENTUM}, batch {BATCH}, {epochs} epochs, target {args.target:.1%}\n# {machine()}\n",
          flush=True)
    unison.fit(model, (x[:1024], y[:1024]), workers=workers, backend="processes", epochs=1, progress=False)
    rows = []
    for label, settings in methods(every, workers):
        result = unison.fit(model, (x, y), val=(x_test, y_test), workers=workers, backend="processes",
                            epochs=epochs, batch_size=BATCH, lr=LR, momentum=MOMENTUM, progress=False,
                            speeds=speeds, **settings)
        history = result.history
        rows.append({"method": label, "time_to_target": time_to(history, args.target),
                     "final_acc": history[-1]["val_acc"], "best_acc": max(r["val_acc"] for r in history),
                     "wall_s": history[-1]["wall_s"], "waited_s": sum(r.get("simulated_wait_s", 0.0) for r in history),
                     "dropped": sum(r.get("dropped", 0) for r in history), "rounds": len(history)})
        print(f"  {rows[-1]}", flush=True)
    by_label = {row["method"]: row["time_to_target"] for row in rows}
    reference = {"periodic": by_label[f"periodic(every={every}), waiting"],
                 "epoch": by_label["periodic(every=epoch), waiting"], "sync": by_label["sync, waiting"]}
    for row in rows:
        base = reference["sync" if row["method"].startswith("sync") else
                         "epoch" if "every=epoch" in row["method"] else "periodic"]
        row["ratio"] = base / row["time_to_target"] if base and row["time_to_target"] else None
    print()
    print(table(rows, [("method", "{}"), ("rounds", "{}"), ("dropped", "{}"), ("time_to_target", "{:.2f}"),
                       ("ratio", "{:.2f}×"), ("final_acc", "{:.2%}"), ("best_acc", "{:.2%}"), ("wall_s", "{:.2f}"),
                       ("waited_s", "{:.1f}")]))
    print("\nratio = the same rounds' waiting run's time to target / the method's; dropped = straggler-rounds "
          "left out of merges; waited_s = simulated waiting, all workers.")


if __name__ == "__main__":
    main()
