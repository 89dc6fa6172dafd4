"""Start-up: ``import unison`` against ``import torch``, and from the fit() call to the first
training step, 2 workers on ``processes``.

Each case runs in a fresh interpreter, as a user's script would. The script has no
``__main__`` guard and imports scikit-learn and matplotlib: the workers re-import none of it.

- import torch / import unison: each alone, and unison after torch (what unison adds);
- cold (UNISON_PRESTART=0): the script loads its data, then calls fit(), which starts the
  forkserver itself;
- first fit: the forkserver started at ``import unison``, the script loads its data, fit();
- first fit after 1.5 s of work: the same with 1.5 s of the script's own work (a sleep standing
  for loading and preprocessing a larger data set) before fit(), nothing else called;
- later fit: a second fit() in the same script (the forkserver is kept between runs);
- spawn (no unison): torch.multiprocessing spawns 2 processes that import torch, join a gloo
  group and build their optimizer, the way a hand-written DDP script starts.

The data is the bench workload's 400,000 rows (read from bench/.cache); one epoch of
periodic(every=epoch) on its first 20,000 rows is trained, so only the start-up matters.

    .venv/bin/python bench/startup.py [--repeat 3]

It measures and prints; it asserts nothing. Results go into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from workload import machine, table

HERE = Path(__file__).parent
SRC = HERE.parent / "src"

SCRIPT = """
import json, sys, time
sys.path.insert(0, {here!r})
import matplotlib.pyplot, sklearn.ensemble  # a script's own imports: the workers do not repeat them
import unison
from workload import dataset, model

loaded = time.time()
x, y, _, _ = dataset()
load_s = time.time() - loaded
time.sleep({work})
startup = []
for _ in range(2):
    startup.append(unison.fit(model, (x[:20000], y[:20000]), val=None, strategy="periodic(every=epoch)",
                              workers=2, backend="processes", epochs=1, batch_size=64,
                              progress=False).startup_s)
print(json.dumps({{"load_s": load_s, "first": startup[0], "second": startup[1]}}))
"""

IMPORT = """
import json, time
started = time.perf_counter()
{before}
middle = time.perf_counter()
{after}
print(json.dumps({{"before": middle - started, "after": time.perf_counter() - middle}}))
"""

SPAWN = """
import json, time
import torch.multiprocessing as mp

def worker(rank, port, started, queue):
    import torch, torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{{port}}", rank=rank, world_size=2)
    torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)  # (imports torch._dynamo, as unison's workers do)
    dist.barrier()
    if rank == 0:
        queue.put(time.time() - started)
    dist.destroy_process_group()

if __name__ == "__main__":
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    started = time.time()
    mp.start_processes(worker, args=(port, started, queue), nprocs=2, start_method="spawn")
    print(json.dumps({{"spawn": queue.get()}}))
"""


def run_script(code: str, path: Path, **env: str) -> dict:
    path.write_text(code)
    environment = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=environment | env)
    if done.returncode:
        raise SystemExit(f"{path.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"# start-up: imports, and fit() to first step with 2 workers on processes\n# {machine()}\n", flush=True)
    scratch = HERE / ".cache"
    scratch.mkdir(exist_ok=True)
    best: dict[str, float] = {}
    load_s = float("inf")

    def keep(key: str, seconds: float) -> None:  # each case keeps its fastest run: the machine is shared
        best[key] = min(best.get(key, float("inf")), seconds)

    for _ in range(args.repeat):
        imports = scratch / "startup_import.py"
        keep("import torch", run_script(IMPORT.format(before="import torch", after=""), imports)["before"])
        keep("import unison (alone)", run_script(IMPORT.format(before="import unison", after=""), imports)["before"])
        keep("import unison after torch: added",
             run_script(IMPORT.format(before="import torch", after="import unison"), imports)["after"])
        for key, prestart, work in (("cold (UNISON_PRESTART=0)", "0", 0.0), ("first fit", "1", 0.0),
                                    ("first fit after 1.5 s of work", "1", 1.5)):
            got = run_script(SCRIPT.format(here=str(HERE), work=work), scratch / "startup_case.py",
                             UNISON_PRESTART=prestart)
            keep(key, got["first"])
            keep("later fit", got["second"])
            load_s = min(load_s, got["load_s"])
        keep("spawn (no unison)", run_script(SPAWN.format(), scratch / "startup_spawn.py")["spawn"])
    print(table([{"case": case, "seconds": seconds} for case, seconds in best.items()],
                [("case", "{}"), ("seconds", "{:.2f}")]))
    print(f"\nthe script's data loading (400,000 rows from .npz) took {load_s:.2f} s; the forkserver "
          "started at import unison imports torch during it.")


if __name__ == "__main__":
    main()
