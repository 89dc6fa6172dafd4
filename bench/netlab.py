"""One two-host run, timed: two network namespaces joined by a veth pair (unison.netlab), the
link limited with ``tc ... tbf rate R``, the README's multi-node torchrun command in each.

    sudo .venv/bin/python bench/netlab.py [--rate 100mbit] [--strategy sync] [--nproc-per-node 1]

Needs root (``ip netns``). It measures and prints; it asserts nothing (tests/test_netlab.py
holds the runs to threads).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from unison import netlab

RUN = """
[data]
dataset = "digits"
[model]
hidden = [64]
[train]
strategy = "{strategy}"
workers = 2
backend = "processes"
epochs = {epochs}
batch_size = 16
lr = 0.05
momentum = 0.9
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default=None, help="tbf rate of the link, e.g. 100mbit (default: unlimited)")
    parser.add_argument("--strategy", default="sync")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    args = parser.parse_args()
    why = netlab.available()
    if why:
        sys.exit(f"netlab: {why}")
    with tempfile.TemporaryDirectory() as folder:
        run_file = Path(folder) / "run.toml"
        run_file.write_text(RUN.format(strategy=args.strategy, epochs=args.epochs))
        run = netlab.train(run_file, Path(folder) / "run", rate=args.rate, nproc_per_node=args.nproc_per_node)
        if run.failure:
            print(run.failure)
        last = run.records[-1] if run.records else {}
        print(f"| link | strategy | hosts x procs | exit codes | wall (s) | final val acc |\n"
              f"| --- | --- | --- | --- | --- | --- |\n"
              f"| {args.rate or 'veth, unlimited'} | {args.strategy} | 2 x {args.nproc_per_node} | {run.exit_codes} "
              f"| {run.seconds:.1f} | {last.get('val_acc', '-')} |")


if __name__ == "__main__":
    main()
