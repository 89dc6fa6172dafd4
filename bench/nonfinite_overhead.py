"""What the per-step non-finite check costs: time per training step with it and without it.

    python bench/nonfinite_overhead.py [--repeats 3] [--epochs 10]   # end to end, 2 workers
    python bench/nonfinite_overhead.py --micro                       # the check alone, 1 thread

The check is one pass over the gradients (their sums) and one host sync per step, with no
collective: on shared steps (sync) the verdict rides on the gradient all-reduce, on local steps
(periodic) a replica acts alone. "off" replaces the check by a no-op; the workers of
the processes backend re-import this script, so the switch reaches them too (UNISON_BENCH_CHECK).
Prints a table; asserts nothing (machines differ).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import unison
from unison.engine import guard as nonfinite
from unison.models import mlp

if os.environ.get("UNISON_BENCH_CHECK") == "off":  # at import: spawned workers run this too
    nonfinite.NonFiniteGuard.before_exchange = lambda self, loss: None
    nonfinite.NonFiniteGuard.check = lambda self, shared: nonfinite.GOOD


def per_step_ms(strategy: str, backend: str, hidden: list[int], batch: int, epochs: int) -> float:
    data = unison.data.prepare("digits")
    result = unison.fit(lambda: mlp(64, hidden, 10), data, strategy=strategy, workers=2, backend=backend,
                        epochs=epochs, batch_size=batch, lr=0.05, progress=False)
    steps = result.history[-1]["step"]
    return 1000 * (result.history[-1]["wall_s"] - result.startup_s) / steps


def micro() -> None:
    """The check's own cost per step next to one replica's step, in one thread: what a busy
    machine cannot blur (the end-to-end table includes everything, noise too)."""
    import time

    import torch

    from unison.comm.base import Solo
    from unison.engine.replica import Replica

    torch.set_num_threads(1)
    print(f"{'model':<18} {'batch':>5} {'step':>10} {'check':>10} {'share':>7}")
    for hidden, batch in (([64], 16), ([512, 512], 64), ([2048, 2048], 256)):
        torch.manual_seed(0)
        model = mlp(64, hidden, 10)
        replica = Replica(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                          torch.nn.functional.cross_entropy, torch.device("cpu"))
        guard = nonfinite.NonFiniteGuard("stop", replica, Solo())
        x, y = torch.randn(batch, 64), torch.randint(0, 10, (batch,))

        def timed(body, repeats=300):
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(repeats):
                    body()
                best = min(best, (time.perf_counter() - start) / repeats)
            return best

        def step():
            replica.forward_backward(x, y)
            replica.optimizer.step()

        loss = replica.forward_backward(x, y)
        step_s = timed(step, 50)
        check_s = timed(lambda: (guard.before_exchange(loss), guard.check(shared=False)))
        name = "64-" + "x".join(map(str, hidden)) + "-10"
        print(f"{name:<18} {batch:>5} {step_s * 1e6:>8.0f}us {check_s * 1e6:>8.1f}us {check_s / step_s:>7.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--micro", action="store_true", help="the check alone, next to one replica's step")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # strategy backend hidden batch
    args = parser.parse_args()
    if args.micro:
        micro()
        return
    if args.one:
        strategy, backend, hidden, batch = args.one
        print(per_step_ms(strategy, backend, [int(h) for h in hidden.split("x")], int(batch), args.epochs))
        return
    print(f"{'strategy':<20} {'backend':<10} {'model':<16} {'batch':>5} {'check on':>9} {'off':>9} {'overhead':>9}")
    for strategy in ("periodic(every=epoch)", "sync"):
        for backend in ("threads", "processes"):
            for hidden, batch in (("64", 16), ("512x512", 64)):
                runs: dict[str, list[float]] = {"on": [], "off": []}
                for _ in range(args.repeats):  # interleaved, so that a change in load hits both alike
                    for check in ("on", "off"):  # a fresh interpreter each: the switch is read at import
                        env = dict(os.environ, UNISON_BENCH_CHECK=check)
                        done = subprocess.run([sys.executable, __file__, "--epochs", str(args.epochs), "--one",
                                               strategy, backend, hidden, str(batch)],
                                              capture_output=True, text=True, env=env, check=True)
                        runs[check].append(float(done.stdout.strip().splitlines()[-1]))
                times = {check: min(values) for check, values in runs.items()}  # the least disturbed run
                overhead = times["on"] / times["off"] - 1
                print(f"{strategy:<20} {backend:<10} {'64-' + hidden + '-10':<16} {batch:>5} "
                      f"{times['on']:>7.3f}ms {times['off']:>7.3f}ms {overhead:>8.1%}", flush=True)


if __name__ == "__main__":
    main()
