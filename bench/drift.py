"""Drift correction on label-skewed shares: final accuracy of periodic, fedprox, scaffold,
fednova and diloco over several seeds (issue 15's second target).

    python bench/drift.py [--workers 8] [--seeds 5] [--epochs 20] [--every 55|epoch]
                          [--partitions "shard,dirichlet(0.1),pathological(2),powerlaw(1.5)"]

Each strategy merges every 55 steps (five epochs of a 179-sample share: McMahan et al.'s E=5;
``--every epoch``: each epoch) on digits with an MLP (64 hidden), plain SGD with momentum 0.9, on the stacked backend (8 replicas in one process: the accuracy is what is
measured, and it does not depend on the backend). Prints, per partition, the final validation
accuracy as mean ± the half-width of a 95% t interval over the seeds, and whether it is clearly
above or below periodic's: the mean ± 95% interval of the per-seed differences (each seed gives
both runs the same split, start and shares), "clearly" when that interval excludes 0. Asserts
nothing.
"""

from __future__ import annotations

import argparse

import torch

from unison import fit
from unison.data import prepare
from unison.models import mlp
from unison.partitions import describe
from unison.verdict import mean_interval

STRATEGIES = ("periodic", "fedprox(mu=0.01)", "fedprox(mu=0.1)", "scaffold", "scaffold(init=\"gradient\")",
              "fednova", "diloco")


def final_accuracy(strategy: str, partition: str, workers: int, epochs: int, seed: int, every: str) -> float:
    if every != "epoch":  # every strategy here merges every `every` steps
        strategy = f"{strategy[:-1]}, every={every})" if strategy.endswith(")") else f"{strategy}(every={every})"
    result = fit(lambda: mlp(64, [64], 10), "digits", 0.2, strategy=strategy, partition=partition,
                 workers=workers, backend="stacked", epochs=epochs, batch_size=16, lr=0.05, momentum=0.9,
                 seed=seed, progress=False)
    return result.history[-1]["val_acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--partitions", default="shard,dirichlet(0.1),pathological(2),powerlaw(1.5)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--every", default="55", help="steps between merges, or epoch (default 55: five local epochs of a share, FedAvg E=5)")
    args = parser.parse_args()
    torch.manual_seed(0)
    strategies = _split(args.strategies)
    print(f"# bench/drift.py: digits, MLP 64-64-10, {args.workers} workers (stacked), {args.epochs} epochs, "
          f"a merge every {args.every if args.every != 'epoch' else 'epoch'}{' steps' if args.every != 'epoch' else ''}, SGD lr 0.05 momentum 0.9, seeds 0..{args.seeds - 1}, torch {torch.__version__}")
    for partition in _split(args.partitions):
        print(f"\n## partition {partition}\n")
        print("Seed 0's shares, samples of each class per worker:\n\n```\n"
              + describe(partition, prepare("digits", 0.2, seed=0).y, args.workers, seed=0) + "\n```\n")
        print("| strategy | final accuracy (mean ± 95% interval) | per seed | vs periodic, paired by seed |")
        print("| --- | ---: | --- | --- |")
        reference = None
        for strategy in strategies:
            accs = [final_accuracy(strategy, partition, args.workers, args.epochs, seed, args.every)
                    for seed in range(args.seeds)]
            mean, half = mean_interval(accs)
            half = half or 0.0
            if reference is None:
                reference, versus = accs, "—"
            else:  # paired by seed: the same split, start and shares
                gap, gap_half = mean_interval([a - b for a, b in zip(accs, reference)])
                gap_half = gap_half or 0.0
                verdict = "clearly better" if gap - gap_half > 0 else "clearly worse" if gap + gap_half < 0 else "no clear difference"
                versus = f"{gap * 100:+.1f} ± {gap_half * 100:.1f} points ({verdict})"
            seeds = ", ".join(f"{a:.1%}" for a in accs)
            print(f"| {strategy} | {mean:.1%} ± {half:.1%} | {seeds} | {versus} |", flush=True)


def _split(text: str) -> list[str]:
    """Comma-separated specs, commas inside parentheses kept."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return parts + [current.strip()] if current.strip() else parts


if __name__ == "__main__":
    main()
