"""Chaos trials for checkpoints and resume (issue 13): kill, fill the disk, corrupt; then resume.

    python bench/chaos.py --trials 5 --seed 0 --backend processes

Each trial runs a tiny `unison train` (digits, a 64-16-10 MLP, periodic(every=8), 2 workers,
a checkpoint every 2 rounds) as a subprocess, does something bad to it, then runs `unison
train --resume` and compares the result with an uninterrupted reference run of the same seed:

  kill-worker       SIGKILL one worker process at a random moment (not on threads)
  kill-parent       SIGKILL the process that ran `unison train` (on torchrun: the agent): a
                    quarter of the time while it starts, else at a random moment of training
  disk-full         the run folder on a small tmpfs (`mount -t tmpfs`), filled to a random
                    free space; after the run the space is freed and the run resumed. Without
                    root (or with --simulate-enospc) it is simulated: open() in the run raises
                    ENOSPC under the run folder after a random number of bytes
                    (sitecustomize), and the table says "simulated"
  corrupt-truncate  kill the parent once two checkpoints exist, then truncate a file of the
  corrupt-flip      newest one / flip a byte in it / delete one of its files / write a bad
  corrupt-delete    MANIFEST.json (invalid JSON, a wrong SHA-256 or a missing key); resume must
  corrupt-manifest  fall back to the older checkpoint

Columns: survived = every command ended by itself within its timeout (completion or a one-line
error, no "Traceback" on stderr); resumable = trials that left an unfinished run to resume;
exact = resumed runs whose model.safetensors is bit-identical (torch.equal on every tensor) to
the reference; lost = trials where a checkpoint written before the chaos (other than the one
deliberately corrupted) did not verify afterwards, or the run folder vanished; orphans = trials
with worker processes still alive 2 s after the parent's death (found by a unique environment
variable UNISON_CHAOS_MARK in /proc/*/environ; they are then killed so trials stay apart);
helpers = trials where only multiprocessing's resource tracker or fork server outlived it by 12 s
(they exit on their own once the parent is gone, after shutting their interpreter down).
Every subprocess has a timeout; a hang counts as not survived.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from unison import checkpoint as checkpoints  # noqa: E402

SCENARIOS = ("kill-worker", "kill-parent", "disk-full", "corrupt-truncate", "corrupt-flip",
             "corrupt-delete", "corrupt-manifest")
MARK = "UNISON_CHAOS_MARK"
RUN = """\
[data]
dataset = "digits"
val_fraction = 0.2
[model]
hidden = [16]
[train]
strategy = "periodic(every=8)"
workers = 2
backend = "{backend}"
epochs = {epochs}
batch_size = 32
lr = 0.05
momentum = 0.9
seed = {seed}
checkpoint_every = 2
"""
# Installed as sitecustomize.py when tmpfs cannot be mounted: the run's writes under the run
# folder fail with ENOSPC once UNISON_CHAOS_ENOSPC bytes have been written there.
_ENOSPC_HOOK = """\
import builtins, errno, io, os
_limit = int(os.environ.get("UNISON_CHAOS_ENOSPC", "-1"))
_root = os.environ.get("UNISON_CHAOS_ROOT", "")
if _limit >= 0 and _root:
    _written = [0]
    _open = builtins.open
    class _Full(io.FileIO):
        def write(self, data):
            _written[0] += len(data)
            if _written[0] > _limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
            return super().write(data)
    def _guarded(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file).startswith(_root) \\
                and any(c in mode for c in "wax+"):
            buffering = kwargs.pop("buffering", args[0] if args else -1)
            raw = _Full(file, mode.replace("b", "").replace("t", "") or "w")
            if "b" in mode:
                return raw if buffering == 0 else io.BufferedWriter(raw)
            return io.TextIOWrapper(io.BufferedWriter(raw), encoding=kwargs.get("encoding"))
        return _open(file, mode, *args, **kwargs)
    builtins.open = _guarded
"""


@dataclass
class Row:
    trials: int = 0
    survived: int = 0
    resumable: int = 0
    exact: int = 0
    lost: int = 0
    orphans: int = 0
    helpers: int = 0
    notes: list[str] = field(default_factory=list)


class Chaos:
    def __init__(self, backend: str, seed: int, work: Path, timeout: float, epochs: int, simulate: bool = False):
        self.backend, self.seed, self.work, self.timeout, self.epochs = backend, seed, work, timeout, epochs
        self.run_file = work / "run.toml"
        self.run_file.write_text(RUN.format(backend="processes" if backend == "torchrun" else backend,
                                            epochs=epochs, seed=seed))
        self.python = sys.executable
        self.mounted = not simulate and self._can_mount()
        self.hook = work / "hook"
        self.hook.mkdir()
        (self.hook / "sitecustomize.py").write_text(_ENOSPC_HOOK)
        self.reference, self.reference_s = self._reference()
        self.train_s = _train_seconds(self.work / "reference.first.out")

    # ---- processes -------------------------------------------------------------------------

    def command(self, out: Path, resume: bool = False) -> list[str]:
        train = ["--resume", str(out)] if resume else [str(self.run_file), "--out", str(out)]
        if self.backend == "torchrun":
            return [self.python, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    str(random.Random().randrange(20000, 40000)), "-m", "unison", "train", *train, "--quiet"]
        return [self.python, "-m", "unison", "train", *train, "--quiet"]

    def start(self, out: Path, mark: str, resume: bool = False, extra_env: dict | None = None):
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), **{MARK: mark})
        env.update(extra_env or {})
        logs = out.parent / f"{out.name}.{'resume' if resume else 'first'}"
        command = self.command(out, resume)
        stdout, stderr = open(f"{logs}.out", "wb"), open(f"{logs}.err", "wb")
        process = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                   cwd=self.work, start_new_session=True)
        stdout.close()
        stderr.close()
        process.logs = logs  # type: ignore[attr-defined]
        return process

    def wait(self, process) -> tuple[bool, str]:
        """(ended by itself within the timeout with no traceback, stderr)."""
        try:
            process.wait(timeout=self.timeout)
            ended = True
        except subprocess.TimeoutExpired:
            ended = False
            _kill_group(process.pid)
            process.wait()
        err = Path(f"{process.logs}.err").read_text(errors="replace")
        return ended and not _traceback(err), err

    def _reference(self) -> tuple[dict[str, torch.Tensor], float]:
        out = self.work / "reference"
        began = time.monotonic()
        process = self.start(out, f"ref-{uuid.uuid4().hex}")
        ok, err = self.wait(process)
        if not ok or process.returncode != 0:
            raise SystemExit(f"the reference run failed: {err[-2000:]}")
        return load_file(out / "model.safetensors"), time.monotonic() - began

    def _can_mount(self) -> bool:
        probe = self.work / "probe"
        probe.mkdir()
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                                  capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False
        if done:
            subprocess.run(["umount", str(probe)], capture_output=True, timeout=10)
        return done

    # ---- one trial ---------------------------------------------------------------------------

    def trial(self, scenario: str, index: int, rng: random.Random, row: Row) -> None:
        folder = self.work / f"{scenario}-{index}"
        folder.mkdir()
        out, mark = folder / "run", f"{scenario}-{index}-{uuid.uuid4().hex}"
        row.trials += 1
        survived, lost, corrupted = True, False, None
        extra_env, filler = {}, None
        if scenario == "disk-full":
            if self.mounted:
                subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], check=True,
                               timeout=10)
                free = shutil.disk_usage(folder).free
                filler = folder / "filler"
                filler.write_bytes(b"\0" * max(0, free - rng.randrange(0, 160 << 10)))
            else:
                extra_env = {"PYTHONPATH": f"{self.hook}:{ROOT / 'src'}", "UNISON_CHAOS_ROOT": str(folder),
                             "UNISON_CHAOS_ENOSPC": str(rng.randrange(4 << 10, 160 << 10))}
        try:
            process = self.start(out, mark, extra_env=extra_env)
            self._mark_of = {process.pid: mark}
            self.helpers: set[int] = set()
            if scenario == "kill-worker":
                self._kill_worker(process, mark, rng)
            elif scenario == "kill-parent":
                self._kill_parent(process, out, rng)
            elif scenario.startswith("corrupt"):
                self._until_checkpoints(process, out, 2)
                self._kill_parent_now(process, mark)
            if scenario in ("kill-parent",) or scenario.startswith("corrupt"):
                try:
                    process.wait(timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    survived = False
                alive = _outliving(mark, 2.0)
                if alive and all(pid in self.helpers for pid in alive):  # helpers leave on their own,
                    alive = _outliving(mark, HELPER_GRACE_S)               # once their interpreter shuts down
                if alive:
                    workers = [pid for pid in alive if pid not in self.helpers]
                    row.orphans += bool(workers)
                    row.helpers += len(workers) < len(alive)
                    row.notes.append(f"{scenario} #{index}: {len(workers)} worker(s) and {len(alive) - len(workers)} "
                                     "multiprocessing helper(s) alive 2 s (helpers: 12 s) after the parent: "
                                     + "; ".join(f"{pid} {_cmdline(pid)[:90]}" for pid in alive))
                    for pid in alive:
                        _kill(pid)
                    time.sleep(0.2)
            else:
                ok, err = self.wait(process)
                survived = ok
                row.notes.append(f"{scenario} #{index}: first run: exit {process.returncode}: {_last_line(err)}")
                if alive := _outliving(mark, 2.0):  # a worker left by a run that ended is an orphan too
                    row.orphans += 1
                    row.notes.append(f"{scenario} #{index}: {len(alive)} orphan(s) alive 2 s after the parent: "
                                     + "; ".join(_cmdline(pid) for pid in alive))
                    for pid in alive:
                        _kill(pid)
            if filler is not None:
                filler.unlink()
            partial = checkpoints_dir(out, partial=True)
            seen = set(checkpoints.steps_on_disk(partial))
            if scenario.startswith("corrupt") and seen:
                corrupted = max(seen)
                what = corrupt(partial / checkpoints.directory_name(corrupted), scenario, rng)
                row.notes.append(f"{scenario} #{index}: {what}")
            for step in seen - {corrupted}:
                try:
                    checkpoints.load(partial / checkpoints.directory_name(step))
                except checkpoints.CheckpointError as exc:
                    lost = True
                    row.notes.append(f"{scenario} #{index}: lost: {exc}")
            unfinished = (out.parent / f".{out.name}.partial" / "config.toml").exists()
            if not unfinished and not out.exists() and seen:
                lost = True
                row.notes.append(f"{scenario} #{index}: lost: the run folder is gone")
            if unfinished:
                row.resumable += 1
                resumed = self.start(out, mark + "-resume", resume=True)
                ok, err = self.wait(resumed)
                if not ok:
                    survived = False
                    row.notes.append(f"{scenario} #{index}: resume: {_last_line(err)}")
                elif resumed.returncode != 0:
                    row.notes.append(f"{scenario} #{index}: resume failed: {_last_line(err)}")
                if resumed.returncode == 0 and self._exact(out):
                    row.exact += 1
                elif resumed.returncode == 0:
                    row.notes.append(f"{scenario} #{index}: resumed model differs from the reference")
                for pid in _marked(mark + "-resume"):
                    _kill(pid)
        finally:
            if scenario == "disk-full" and self.mounted:
                subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=10)
        row.survived += survived
        row.lost += lost

    def _exact(self, out: Path) -> bool:
        model = load_file(out / "model.safetensors")
        return model.keys() == self.reference.keys() and all(torch.equal(model[k], self.reference[k])
                                                             for k in model)

    def _when(self, process, delay: float, then) -> None:
        end = time.monotonic() + delay
        while time.monotonic() < end and process.poll() is None:
            time.sleep(0.01)
        then()

    def _kill_worker(self, process, mark: str, rng: random.Random) -> None:
        """SIGKILL one worker a random moment after the workers exist."""
        deadline = time.monotonic() + self.timeout
        while process.poll() is None and time.monotonic() < deadline:
            if len(self._workers(process, mark)) >= 2:
                break
            time.sleep(0.01)
        else:
            return
        self._when(process, rng.uniform(0.0, self.train_s), lambda: None)
        if workers := self._workers(process, mark):
            _kill(rng.choice(workers))

    def _kill_parent(self, process, out: Path, rng: random.Random) -> None:
        """SIGKILL the parent: a quarter of the time while it starts, else a random moment of the
        training (from the unfinished run's config.toml on, the training's length in the reference)."""
        if rng.random() < 0.25:
            self._when(process, rng.uniform(0.2, 2.0), lambda: None)
        else:
            config = out.parent / f".{out.name}.partial" / "config.toml"
            deadline = time.monotonic() + self.timeout
            while process.poll() is None and not config.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            self._when(process, rng.uniform(0.0, self.train_s * 1.2), lambda: None)
        self._kill_parent_now(process, self._mark_of[process.pid])

    def _kill_parent_now(self, process, mark: str) -> None:
        """SIGKILL the parent, noting its multiprocessing helpers first (reparented once it is
        dead, they can no longer be told from workers by their parent)."""
        self.helpers = {p for p in _marked(mark) if _parent(p) == process.pid
                        and any(h in _cmdline(p) for h in ("resource_tracker", "forkserver"))}
        _kill(process.pid)

    @staticmethod
    def _workers(process, mark: str) -> list[int]:
        """The run's worker processes: all but the parent and multiprocessing's helpers (the
        resource tracker and the fork server, whose children the workers are, with its cmdline)."""
        return [p for p in _marked(mark) if p != process.pid and "resource_tracker" not in _cmdline(p)
                and not (_parent(p) == process.pid and "forkserver" in _cmdline(p))]

    def _until_checkpoints(self, process, out: Path, count: int) -> None:
        deadline = time.monotonic() + self.timeout
        partial = checkpoints_dir(out, partial=True)
        while process.poll() is None and time.monotonic() < deadline:
            if len(checkpoints.steps_on_disk(partial)) >= count:
                return
            time.sleep(0.005)


def checkpoints_dir(out: Path, partial: bool) -> Path:
    return (out.parent / f".{out.name}.partial" if partial else out) / "checkpoints"


def corrupt(path: Path, scenario: str, rng: random.Random) -> str:
    """Damage checkpoint ``path`` as ``scenario`` says; what was done."""
    names = sorted(p.name for p in path.iterdir())
    if scenario == "corrupt-manifest":
        manifest = path / checkpoints.MANIFEST
        kind = rng.choice(["invalid JSON", "a wrong SHA-256", "no files key"])
        value = json.loads(manifest.read_text())
        if kind == "invalid JSON":
            manifest.write_text(manifest.read_text()[: rng.randrange(1, 40)])
        elif kind == "a wrong SHA-256":
            entry = value["files"][rng.choice(sorted(value["files"]))]
            entry["sha256"] = "0" * 64
            manifest.write_text(json.dumps(value))
        else:
            del value["files"]
            manifest.write_text(json.dumps(value))
        return f"{path.name}: MANIFEST.json given {kind}"
    name = rng.choice(names)
    target = path / name
    if scenario == "corrupt-truncate":
        size = target.stat().st_size
        keep = rng.randrange(0, size)
        os.truncate(target, keep)
        return f"{path.name}/{name} truncated from {size} to {keep} bytes"
    if scenario == "corrupt-flip":
        data = bytearray(target.read_bytes())
        where = rng.randrange(len(data))
        data[where] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
        return f"{path.name}/{name}: a bit flipped at byte {where}"
    target.unlink()
    return f"{path.name}/{name} deleted"


def _marked(mark: str) -> list[int]:
    """PIDs whose environment holds MARK=mark exactly."""
    needle = f"{MARK}={mark}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# How long multiprocessing's helpers (the fork server, which preloads torch, and the resource
# tracker) may take to exit once their parent is gone: they notice at once (their pipe closes)
# but then shut their interpreter down, which took 2–8 s on the 2-vCPU VM (2026-12-02). Workers
# must be gone within 2 s.
HELPER_GRACE_S = 10.0


def _outliving(mark: str, seconds: float) -> list[int]:
    """The marked processes still alive ``seconds`` from now (returns early once there are none)."""
    end = time.monotonic() + seconds
    while (alive := _marked(mark)) and time.monotonic() < end:
        time.sleep(0.05)
    return alive


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return f"{pid} (gone)"


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _train_seconds(log: Path) -> float:
    """The reference run's time from its workers' start to its end ("done in T s (start-up S s)")."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("done in"):
            words = line.replace("(", " ").split()
            return max(0.2, float(words[2]) - float(words[5]))
    return 1.0


def _traceback(err: str) -> bool:
    """Whether stderr holds a traceback of unison's; torchrun's agent prints its own for any rank
    that fails (ChildFailedError), which is torchrun's way of reporting, not a crash of unison's."""
    return err.count("Traceback (most recent call last)") > err.count("errors.ChildFailedError")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if _traceback(text):
        return "traceback: " + (lines[-1] if lines else "")
    return lines[-1][:200] if lines else "(nothing on stderr)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3, help="trials per scenario")
    parser.add_argument("--seed", type=int, default=0, help="the trials' randomness and the runs' seed")
    parser.add_argument("--backend", choices=("processes", "threads", "torchrun"), default="processes")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds any one command may take")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--json", help="also write the table as JSON here")
    parser.add_argument("--simulate-enospc", action="store_true",
                        help="disk-full by a patched open() raising ENOSPC even where tmpfs can be mounted")
    parser.add_argument("--keep", action="store_true", help="keep the trials' folders (and logs)")
    parser.add_argument("--verbose", action="store_true", help="print every note")
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    if unknown := set(scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if args.backend == "threads" and "kill-worker" in scenarios:
        scenarios.remove("kill-worker")  # threads are not processes: nothing to kill
    rng = random.Random(args.seed)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="unison-chaos-") as work:
        if args.keep:
            work = tempfile.mkdtemp(prefix="unison-chaos-kept-")
            print(f"keeping the trials' folders in {work}")
        chaos = Chaos(args.backend, args.seed, Path(work), args.timeout, args.epochs, args.simulate_enospc)
        rows = {}
        for scenario in scenarios:
            rows[scenario] = row = Row()
            for index in range(args.trials):
                chaos.trial(scenario, index, rng, row)
        disk = "tmpfs" if chaos.mounted else "simulated ENOSPC"
        reference_s = chaos.reference_s
    print(f"backend={args.backend} seed={args.seed} trials={args.trials} disk-full={disk} "
          f"reference run {reference_s:.1f} s, all {time.monotonic() - began:.0f} s")
    print(f"{'scenario':<18} {'trials':>6} {'survived':>8} {'resumable':>9} {'exact':>5} {'lost':>4} {'orphans':>7} "
          f"{'helpers':>7}")
    for scenario, row in rows.items():
        print(f"{scenario:<18} {row.trials:>6} {row.survived:>8} {row.resumable:>9} {row.exact:>5} "
              f"{row.lost:>4} {row.orphans:>7} {row.helpers:>7}")
    notes = [n for row in rows.values() for n in row.notes]
    problems = [n for n in notes if any(word in n for word in ("lost", "traceback", "differs", "resume",
                                                               "orphan", "nothing on stderr"))
                and ": first run: exit" not in n or "traceback" in n]
    for note in (notes if args.verbose else problems):
        print("  " + note)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"backend": args.backend, "seed": args.seed, "disk_full": disk,
             "rows": {s: {k: v for k, v in vars(r).items()} for s, r in rows.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
