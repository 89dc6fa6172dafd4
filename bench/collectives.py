"""What one collective costs over a real link, against the link model (issue 14, items 5 and 7).

Two hosts (network namespaces joined by a veth pair, ``unison.netlab``; as root), one process on
each, pinned to its own half of the cores as bench/link.py's hosts are, time gloo all-reduces
of float32 vectors of the sizes unison's bench MLP sends a step (8 KB, 90 KB: int8; 340 KB: the
whole gradient; 1.36 MB), three ways:

- back to back: one all-reduce after another, nothing in between;
- after compute: 5 ms of matrix products and a barrier before each, as in a training step;
- two halves: two all-reduces of half the size back to back, as PowerSGD's P and Q.

The table gives each one's median and best milliseconds, and what ``unison.linkmodel`` makes of
its bytes on the link (α = 0, the rate tc was given). On an idle fast link what is left is the
cost of a collective as such: the waiting threads on both hosts woken by the other's message.

    sudo .venv/bin/python bench/collectives.py [--rates veth,1gbit,100mbit] [--repeat 100]

It measures and prints; it asserts nothing. Results go into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = (2_000, 22_500, 85_000, 340_000)  # float32 values: 8 KB, 90 KB, 340 KB, 1.36 MB
WAYS = ("back to back", "after compute", "two halves")
COMPUTE_S = 0.005


def worker(rank: int, address: str, port: int, repeat: int) -> None:
    """One host's side: time every size and way, rank 0 prints them as JSON."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{address}:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # a peer that never came: fail, not hang
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    rows = []
    for n in SIZES:
        whole, halves = torch.randn(n), (torch.randn(n // 2), torch.randn(n - n // 2))
        for way in WAYS:
            times = []
            for _ in range(repeat + 10):  # the first 10 warm up
                if way == "after compute":
                    started = time.perf_counter()
                    while time.perf_counter() - started < COMPUTE_S:
                        a @ b
                    dist.barrier()
                started = time.perf_counter()
                for tensor in (halves if way == "two halves" else (whole,)):
                    dist.all_reduce(tensor)
                times.append(time.perf_counter() - started)
            rows.append({"bytes": 4 * n, "way": way, "median_ms": 1e3 * statistics.median(times[10:]),
                         "best_ms": 1e3 * min(times[10:])})
    if rank == 0:
        print(json.dumps(rows), flush=True)
    dist.destroy_process_group()


def measure(rate: str | None, repeat: int) -> list[dict]:
    from unison import netlab

    with netlab.two_hosts(rate) as hosts, tempfile.TemporaryDirectory() as logs:
        cores = netlab.host_cores(2)
        port = netlab.PORT + 500 + int(hosts[0].namespace.rsplit("-", 1)[1]) % 100
        processes, outputs = [], [Path(logs) / f"host{i}.out" for i in range(2)]
        for rank, host in enumerate(hosts):
            with open(outputs[rank], "w") as output:  # to files: no pipe fills while the other host is read
                processes.append(subprocess.Popen(
                    [*netlab.on_host(host, cores[rank] if cores else None), "env", f"GLOO_SOCKET_IFNAME={host.device}",
                     sys.executable, __file__, "--worker", str(rank), hosts[0].address, str(port), str(repeat)],
                    stdout=output, stderr=subprocess.STDOUT, text=True))
        while any(p.poll() is None for p in processes) and not any(p.poll() for p in processes):
            time.sleep(0.2)  # until both end, or one fails (leaving two_hosts kills the other)
        failed = [i for i, p in enumerate(processes) if p.poll()]
        texts = [path.read_text() for path in outputs]
    rows = next((line for line in reversed(texts[0].splitlines()) if line.startswith("[{")), None)
    if failed or rows is None:
        raise SystemExit(f"collectives: a host failed on {rate or 'veth'}:\n"
                         + "\n".join(texts[i][-2000:] for i in (failed or [0])))
    return json.loads(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="veth,1gbit,100mbit", help="comma-separated: veth (unthrottled) or tc rates")
    parser.add_argument("--repeat", type=int, default=100, help="timed collectives per size and way")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        rank, address, port, repeat = args.worker
        return worker(int(rank), address, int(port), int(repeat))
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from unison import linkmodel, netlab
    from workload import machine

    why = netlab.available()
    if why:
        raise SystemExit(f"collectives: {why}")
    print(f"# one gloo all-reduce between two namespaced hosts, 1 process each, {args.repeat} timed a row\n"
          f"# {machine()}\n")
    print("| link | bytes | way | median ms | best ms | link model ms (bytes only) |")
    print("|---|---|---|---|---|---|")
    for rate in args.rates.split(","):
        link = None if rate == "veth" else linkmodel.parse(rate, "--rates")
        for row in measure(None if rate == "veth" else rate, args.repeat):
            calls = 2 if row["way"] == "two halves" else 1
            model = "—" if link is None else "{:.3f}".format(
                1e3 * linkmodel.collective_seconds("all_reduce", row["bytes"], 2, link, calls=calls))
            print(f"| {rate} | {row['bytes']:,} | {row['way']} | {row['median_ms']:.3f} | {row['best_ms']:.3f} | "
                  f"{model} |", flush=True)


if __name__ == "__main__":
    main()
