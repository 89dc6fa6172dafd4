"""Uneven workers: balanced shares, deadline rounds and asynchronous merges against periodic
waiting for the slow worker (issue 15's first target).

    python bench/uneven.py [--speeds 1,1,1,0.25] [--repeat 3] [--target 0.95] [--backend processes]

Four workers on digits (an MLP, 64 hidden), one of them declared four times slower
(``speeds=``: it waits out three times its own step time, recorded as simulated). Every run
merges every 16 local steps; they differ only in how they meet the slow worker:

- ``periodic`` waits for it at every merge (the baseline);
- ``balance="speed"`` gives each worker a share in proportion to its speed, every epoch;
- ``periodic(min_fraction=0.75)`` closes a round once 3 of 4 workers finished it;
- ``fedbuff`` lets no worker wait: a server rank applies every 2 arrivals, stale ones down-weighted.

Runs through ``unison.compare`` (interleaved repeats, medians), so the table is compare's:
time to the target accuracy, final accuracy, speed-up over ``periodic (waits)``. Asserts
nothing. The figures are wall-clock: take them on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import tempfile

from unison import compare
from unison.models import mlp


def runs(every: int) -> dict[str, dict]:
    return {
        "periodic (waits)": {"strategy": f"periodic(every={every})"},
        "periodic, balance=speed": {"strategy": f"periodic(every={every})", "balance": "speed"},
        "periodic(min_fraction=0.75)": {"strategy": f"periodic(every={every}, min_fraction=0.75)"},
        "fedbuff(buffer=2)": {"strategy": f"fedbuff(every={every}, buffer=2)"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speeds", default="1,1,1,0.25")
    parser.add_argument("--every", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--backend", default="processes")
    parser.add_argument("--quick", action="store_true", help="2 epochs, 1 repeat (a smoke run)")
    args = parser.parse_args()
    speeds = [float(s) for s in args.speeds.split(",")]
    epochs, repeat = (2, 1) if args.quick else (args.epochs, args.repeat)
    with tempfile.TemporaryDirectory() as folder:
        comparison = compare(lambda: mlp(64, [64], 10), "digits", strategies=runs(args.every),
                             workers=len(speeds), backend=args.backend, speeds=speeds, epochs=epochs,
                             batch_size=16, lr=0.05, momentum=0.9, target=args.target, repeat=repeat,
                             out=f"{folder}/compare", progress=False)
        print(f"# bench/uneven.py: digits, MLP 64-64-10, {len(speeds)} workers on {args.backend}, speeds {speeds} "
              f"(simulated), a merge every {args.every} steps, {epochs} epochs, {repeat} repeat(s)\n")
        print(comparison.table())


if __name__ == "__main__":
    main()
