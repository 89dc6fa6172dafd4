"""Peak memory of a 4-worker run on a data set of at least 1 GB, against the data set's size.

The data must be shared, not copied per worker: the target (issue 6) is that the run uses at
most 1.3 × the data set plus one process's baseline, read here as the peak less what the caller
held before fit() (its interpreter and its own copy of the data). Memory is the proportional set size (PSS,
/proc/<pid>/smaps_rollup) summed over this process and every worker it starts, sampled every
50 ms: PSS counts a shared page once across the processes that map it, so it is the machine's
real cost. The baseline is the PSS of one fresh interpreter that imported torch and unison.

    .venv/bin/python bench/memory.py [--quick] [--gigabytes 1.05] [--workers 4]

Linux only. It measures and prints; it asserts nothing. Results go into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

import torch

import unison
from workload import machine, table


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return children + [d for c in children for d in descendants(c)]


class PeakSampler(threading.Thread):
    """Sums PSS over this process and its descendants every ``period`` seconds; keeps the peak."""

    def __init__(self, period: float = 0.05):
        super().__init__(daemon=True)
        self.period, self.peak, self.workers_seen, self._done = period, 0, 0, threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            pids = [os.getpid()] + descendants(os.getpid())
            self.workers_seen = max(self.workers_seen, len(pids) - 1)
            self.peak = max(self.peak, sum(pss_bytes(p) for p in pids))
            time.sleep(self.period)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def baseline_pss() -> int:
    """PSS of a fresh interpreter after `import torch, unison` (what each worker starts from)."""
    code = ("import torch, unison, unison.engine.loop, unison.comm.torch_dist; import sys; "
            "print(open('/proc/self/smaps_rollup').read().split('Pss:')[1].split()[0])")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) * 1024


def model():
    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="0.1 GB instead of 1.05 GB")
    parser.add_argument("--gigabytes", type=float, default=1.05)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--strategy", default="periodic(every=epoch)")
    args = parser.parse_args()
    gigabytes = 0.1 if args.quick else args.gigabytes
    rows = int(gigabytes * 1e9 / (64 * 4 + 8))
    print(f"# memory — {rows:,} rows × 64 float32 + int64 labels, {args.workers} workers, {args.strategy}\n"
          f"# {machine()}\n", flush=True)
    baseline = baseline_pss()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 64, generator=g)
    y = torch.randint(0, 10, (rows,), generator=g)
    data_bytes = x.numel() * x.element_size() + y.numel() * y.element_size()
    before = pss_bytes(os.getpid())
    sampler = PeakSampler()
    sampler.start()
    result = unison.fit(model, (x, y), val=None, strategy=args.strategy, workers=args.workers,
                        backend="processes", epochs=1, batch_size=1024, lr=0.01, progress=False)
    peak = sampler.stop()
    added = peak - before  # what fit() added to what the caller already had (the data included)
    allowed = 1.3 * data_bytes + baseline
    print(table([{"data set": data_bytes / 1e9, "baseline (one process)": baseline / 1e9,
                  "caller before fit": before / 1e9, "peak, all processes": peak / 1e9,
                  "added by fit": added / 1e9, "target 1.3·data + baseline": allowed / 1e9,
                  "added / target": added / allowed, "peak / data": peak / data_bytes,
                  "processes seen": sampler.workers_seen + 1}],
                [("data set", "{:.2f} GB"), ("baseline (one process)", "{:.2f} GB"),
                 ("caller before fit", "{:.2f} GB"), ("peak, all processes", "{:.2f} GB"),
                 ("added by fit", "{:.2f} GB"), ("target 1.3·data + baseline", "{:.2f} GB"),
                 ("added / target", "{:.2f}"), ("peak / data", "{:.2f}"), ("processes seen", "{}")]))
    print(f"\nrun took {result.wall_s:.1f} s (start-up {result.startup_s:.1f} s). 'added by fit' is the peak less "
          "what the caller held before (its interpreter and its copy of the data): the shared-memory copy of "
          "the data that every worker maps, the forkserver and the workers' own memory.")

if __name__ == "__main__":
    main()
