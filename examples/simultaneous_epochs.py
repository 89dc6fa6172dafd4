"""The seed's experiment: train several epochs at once as model clones, then average them.

Every variant starts N replicas from the same weights and averages them; they differ in what
each replica sees and how often they are averaged:

    shards, average per epoch      each replica trains on its own 1/N of every epoch
    same data, average per epoch   each replica trains on all of it, in its own order
                                   (N epochs of work per epoch: "epochs at once")
    shards, average once           independent clones on shards, one average at the end
    same data, average once        independent clones on all the data, one average at the end

`single` (one worker, plain SGD) is the baseline. Writes runs/<date-time>-compare/ with the
table, the plots and report.html. Run from the repository root:

    python examples/simultaneous_epochs.py                 # 2 workers on processes, digits
    python examples/simultaneous_epochs.py --workers 4 --epochs 30 --backend threads
"""

import argparse

import unison

VARIANTS = {
    "single": "single",
    "shards, average per epoch": {"strategy": "periodic(every=epoch)", "partition": "shard"},
    "same data, average per epoch": {"strategy": "periodic(every=epoch)", "partition": "full"},
    "shards, average once": {"strategy": "oneshot", "partition": "shard"},
    "same data, average once": {"strategy": "oneshot", "partition": "full"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits", help="a built-in name or a .csv/.npz/.pt file")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backend", default="processes", choices=["threads", "processes"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", help="output directory (default runs/<date-time>-compare)")
    args = parser.parse_args()

    comparison = unison.compare(data=args.data, strategies=VARIANTS, workers=args.workers,
                                backend=args.backend, epochs=args.epochs, out=args.out)
    print(comparison.table())
    print(f"report: {comparison.out / 'report.html'}")


if __name__ == "__main__":  # required: the processes backend re-imports this file in each worker
    main()
