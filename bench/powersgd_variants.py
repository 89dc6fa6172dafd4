"""PowerSGD two-sided (Vogels et al. 2019; DDP's hook) against unison's alternating variant
(``powersgd(rank, alternate=true)``: one all-reduce a step), for accuracy only: the final
validation accuracy of each against uncompressed ``sync``, over several seeds, on link.py's two
models and data (2 workers, threads: no link, so no time is reported). Time over a link is
bench/link.py's.

    python bench/powersgd_variants.py [--models mlp,wide] [--seeds 3] [--epochs N] [--rank 4]

It measures and prints; it asserts nothing. Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import unison
from link import MODELS, data_file
from workload import BATCH, LR, MOMENTUM, machine, table


def final_accuracy(model, spec: str, seed: int, epochs: int) -> tuple[float, list[float]]:
    arrays = np.load(data_file(model))
    x, y = torch.from_numpy(arrays["X"]), torch.from_numpy(arrays["y"])
    split = model.rows
    result = unison.fit(lambda: unison.models.mlp(64, list(model.hidden), 10), (x[:split], y[:split]),
                        (x[split:], y[split:]), strategy=spec, backend="threads", workers=2, epochs=epochs,
                        batch_size=BATCH, lr=LR, momentum=MOMENTUM, seed=seed, progress=False)
    curve = [r["val_acc"] for r in result.history if r.get("val_acc") is not None]
    return curve[-1], curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,wide")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="default: link.py's epochs for the model, doubled")
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()
    configs = ("sync", f"sync(compress=powersgd({args.rank}))", f"sync(compress=powersgd({args.rank}, alternate=true))")
    print(f"# unison bench/powersgd_variants.py — 2 workers (threads), SGD lr {LR} momentum {MOMENTUM}, "
          f"batch {BATCH} per worker\n# {machine()}\n")
    started = time.time()
    for name in args.models.split(","):
        model = MODELS[name]
        epochs = args.epochs or 2 * model.epochs
        finals = {spec: [] for spec in configs}
        for seed in range(args.seeds):
            for spec in configs:
                final, curve = final_accuracy(model, spec, seed, epochs)
                finals[spec].append(final)
                print(f"  {name} seed {seed} {spec}: " + " ".join(f"{a:.4f}" for a in curve), flush=True)
        rows = []
        for spec in configs:
            gaps = [a - b for a, b in zip(finals[spec], finals["sync"])]
            rows.append({"config": f"`{spec}`", "final": " ".join(f"{100 * a:.2f}" for a in finals[spec]),
                         "mean": f"{100 * statistics.mean(finals[spec]):.2f}",
                         "gap": "-" if spec == "sync" else
                         f"{100 * statistics.mean(gaps):+.2f} (worst {100 * min(gaps):+.2f})"})
        print(f"\n## {name} (MLP 64-{'-'.join(map(str, model.hidden))}-10, {model.parameters / 1e6:.2f} M "
              f"parameters, {model.rows:,} rows, {epochs} epochs, {args.seeds} seeds)\n")
        print(table(rows, [("config", "{}"), ("final", "{}"), ("mean", "{}"), ("gap", "{}")])
              .replace("| config | final | mean | gap |",
                       "| config | final val acc % by seed | mean | vs `sync`, points: mean (worst) |"))
        print()
    print(f"(the bench took {time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
