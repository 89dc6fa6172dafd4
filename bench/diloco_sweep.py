"""diloco's outer step on the default comparison's settings: final accuracy per seed.

Usage: python bench/diloco_sweep.py [SPEC ...] [--seeds K]
A SPEC prefixed with "adamw:" trains with AdamW (lr 1e-3) inside instead of SGD with momentum.
Prints one line per run, then mean and range per spec; asserts nothing (README, "Choosing
diloco's outer step", quotes its figures).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from unison import fit
from unison.models import mlp

SPECS = ("single", "periodic", "diloco(outer_momentum=0.9)", "diloco(every=16, outer_momentum=0.9)",
         "diloco(outer_momentum=0.7)", "diloco", "diloco(every=16)", "adamw:diloco(outer_momentum=0.9)")


def run(spec: str, seed: int) -> tuple[float, float]:
    settings = dict(optimizer="sgd", lr=0.05, momentum=0.9)
    if spec.startswith("adamw:"):
        spec, settings = spec.removeprefix("adamw:"), dict(optimizer="adamw", lr=1e-3)
    result = fit(lambda: mlp(64, [64], 10), "digits", 0.2, strategy=spec, workers=2, backend="threads",
                 epochs=20, batch_size=16, seed=seed, progress=False, **settings)
    last = result.history[-1]
    return last["val_acc"], last["val_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*", default=list(SPECS))
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for spec in args.specs:
        runs = [run(spec, seed) for seed in range(args.seeds)]
        for seed, (acc, loss) in enumerate(runs):
            print(f"{spec} seed {seed}: final accuracy {acc:.2%}, last val loss {loss:.3f}", flush=True)
        accs = [acc for acc, _ in runs]
        rows.append((spec, statistics.mean(accs), min(accs), max(accs), statistics.mean(l for _, l in runs)))
    print(f"\n{'strategy':45s} {'final accuracy':>28s} {'last val loss':>14s}")
    for spec, mean, low, high, loss in rows:
        print(f"{spec:45s} {mean:>10.2%} ({low:.2%}–{high:.2%}) {loss:>14.3f}")


if __name__ == "__main__":
    main()
