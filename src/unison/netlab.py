"""A real two-host network on one machine: two network namespaces joined by a veth pair.

Each namespace is a host with its own address on the link (10.213.0.1 and 10.213.0.2, used only
inside these namespaces); ``tc qdisc ... tbf rate R`` limits the link (netem, which would add
latency, is not in these kernels), its bucket sized to the rate (``burst``); ``throughput``
times one TCP stream over the link, to show the rate it really gives. ``torchrun_hosts`` runs
the README's multi-node command in both namespaces, over the veth addresses, never loopback:

    torchrun --nnodes 2 --nproc-per-node K --node-rank I --rdzv-backend c10d
             --rdzv-endpoint 10.213.0.1:29400 --local-addr <this host> -m unison train RUN_FILE

``train`` runs one such two-host job to its end (or a cap) and returns rank 0's rounds: what
bench/link.py times and `unison reproduce compression` measures on the real link.

Needs root (``ip netns``); the namespaces and the link are deleted on exit, also on failure.
tests/test_netlab.py holds the two-host runs to threads; bench/netlab.py times one.
"""

from __future__ import annotations

import contextlib
import json
import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.213.0"
PORT = 29400
_PAIRS = itertools.count()


@dataclass(frozen=True)
class Host:
    namespace: str
    device: str
    address: str


def _ip(*args: str, namespace: str | None = None) -> None:
    command = ["ip", *(["netns", "exec", namespace, "ip"] if namespace else []), *args]
    subprocess.run(command, check=True, capture_output=True, text=True)


def available() -> str | None:
    """None when namespaces can be made here, else why not (for a test's skip reason)."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the {tool} command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"unison-probe-{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except subprocess.CalledProcessError as exc:
        return f"ip netns add is not allowed here: {exc.stderr.strip()}"
    _ip("netns", "del", name)
    return None


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_unwinds():
    """While the hosts exist, SIGTERM (a scheduler's, `timeout`'s, `kill`'s) raises SystemExit, so
    that ``two_hosts`` still deletes them; Python's default ends the process on the spot and
    leaves both namespaces behind. Only where nobody else handles SIGTERM, in the main thread."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def two_hosts(rate: str | None = None):
    """Two namespaced hosts joined by a veth pair, the link limited to ``rate`` (e.g. "100mbit")
    in both directions when given; yields (host0, host1) and removes everything afterwards,
    also when the process is sent SIGTERM."""
    tag = f"{os.getpid() % 10000}{next(_PAIRS)}"  # a fresh name (and rendezvous port) per pair
    hosts = [Host(f"unison-h{i}-{tag}", f"ulab{i}-{tag}", f"{SUBNET}.{i + 1}") for i in range(2)]
    made: list[str] = []
    with _sigterm_unwinds():
        try:
            for host in hosts:
                _ip("netns", "add", host.namespace)
                made.append(host.namespace)
            _ip("link", "add", hosts[0].device, "type", "veth", "peer", "name", hosts[1].device)
            for host in hosts:
                _ip("link", "set", host.device, "netns", host.namespace)
                _ip("addr", "add", f"{host.address}/24", "dev", host.device, namespace=host.namespace)
                _ip("link", "set", host.device, "up", namespace=host.namespace)
                _ip("link", "set", "lo", "up", namespace=host.namespace)
                if rate is not None:  # a token bucket: the rate, a burst, a queue of at most 400 ms
                    subprocess.run([*on_host(host, None), "tc", "qdisc", "add", "dev", host.device,
                                    "root", "tbf", "rate", rate, "burst", str(burst(rate)), "latency", "400ms"],
                                   check=True, capture_output=True, text=True)
            yield tuple(hosts)
        finally:
            for host in hosts:  # nothing may outlive its host
                if host.namespace in made:
                    kill_host(host)
            for namespace in made:  # deleting a namespace deletes its end of the veth pair, and so the pair
                subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def bits_per_second(rate: str) -> float:
    """tc's rate spelling in bits per second: "100mbit" -> 1e8 ("kbit", "mbit", "gbit", "tbit")."""
    number = rate.lower().removesuffix("bit").removesuffix("ps")
    unit = number[-1] if number and number[-1] in _UNITS else ""
    try:
        return float(number.removesuffix(unit)) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"rate {rate!r} is not a tc rate such as 10mbit, 1gbit") from None


def burst(rate: str) -> int:
    """The token bucket's size in bytes: 1 ms at the rate, at least two full frames. The bucket
    refills while a host computes and its contents then leave at once, which a real link of that
    rate never allows: the old 64 KiB bucket (5 ms at 100 Mbit/s, 52 ms at 10) sent a step's
    all-gather of 90 KB in 4.4 ms at 100 Mbit/s where the link needs 7.5, so that the link model,
    right for a real link, read 30-50% slow against it. tbf splits a GSO segment larger than the
    bucket, so small buckets still give the rate (2026-12-03, one TCP stream: 9.6 of 10, 95.5
    of 100, 955 of 1000 Mbit/s; a bucket of a few packets only choked it at 1 Gbit/s)."""
    return max(2 * 1514, int(bits_per_second(rate) / 8 * 0.001))


def throughput(hosts: tuple[Host, Host], *, seconds: float = 1.0, rate: str | None = None) -> float:
    """Bits per second of one TCP stream from the second host to the first, timed at the
    receiver: about ``seconds`` worth of data at ``rate`` (unlimited: 1 GiB, capped at 10 s)."""
    size = int(bits_per_second(rate) / 8 * seconds) if rate else 1 << 30
    port = PORT - 1
    receiver = subprocess.Popen(
        [*on_host(hosts[0], None), sys.executable, "-c", _RECEIVER, hosts[0].address, str(port)],
        stdout=subprocess.PIPE, text=True)
    try:
        receiver.stdout.readline()  # "listening"
        subprocess.run([*on_host(hosts[1], None), sys.executable, "-c", _SENDER,
                        hosts[0].address, str(port), str(size)], check=True, timeout=60)
        received, took = receiver.communicate(timeout=60)[0].split()
        return int(received) * 8 / float(took)
    finally:
        if receiver.poll() is None:
            receiver.kill()


_RECEIVER = """
import socket, sys, time
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
peer, _ = server.accept()
buffer, got, first = bytearray(1 << 20), 0, None
while True:
    n = peer.recv_into(buffer)
    if not n:
        break
    if first is None:
        first = time.monotonic()
    got += n
print(got, time.monotonic() - first)
"""
_SENDER = """
import socket, sys, time
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
left, chunk, stop = int(sys.argv[3]), bytes(1 << 20), time.monotonic() + 10
while left > 0 and time.monotonic() < stop:
    sock.sendall(chunk[:min(left, len(chunk))])
    left -= len(chunk)
sock.close()
"""


def kill_host(host: Host) -> None:
    """SIGKILL every process in the host's namespace, as a machine that loses power would lose them."""
    found = subprocess.run(["ip", "netns", "pids", host.namespace], capture_output=True, text=True).stdout.split()
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def host_cores(hosts: int) -> list[list[int]] | None:
    """This process's cores dealt out evenly among ``hosts`` (None: fewer cores than hosts)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    share = len(cores) // hosts
    return [cores[i * share:(i + 1) * share] for i in range(hosts)] if share else None


def on_host(host: Host, cores: list[int] | None) -> list[str]:
    """The command prefix that runs a program on ``host``: in its namespace, pinned to ``cores``
    (``taskset``, where there are any and taskset is installed)."""
    pin = ["taskset", "-c", ",".join(map(str, cores))] if cores and shutil.which("taskset") else []
    return ["ip", "netns", "exec", host.namespace, *pin]


def torchrun_hosts(hosts: tuple[Host, Host], run_file: Path, out: Path, *, nproc_per_node: int = 1,
                   extra: tuple[str, ...] = (), output=None) -> list[subprocess.Popen]:
    """Start `torchrun ... -m unison train RUN_FILE --out OUT` in each host's namespace; the
    first host holds the c10d rendezvous. Gloo is told to use the veth device. Each host's
    output goes to a pipe (read it with communicate()), or to ``output[i]``, an open file.

    Each host gets its own half of this machine's cores (``taskset``), as two machines would
    have their own: unison sizes its threads from the cores a process may use, and two hosts
    each taking every core oversubscribed them, which stalled compute for seconds at a time."""
    processes = []
    port = PORT + int(hosts[0].namespace.rsplit("-", 1)[1]) % 1000  # a rendezvous of this pair's own
    inherited = {k: v for k, v in os.environ.items()  # no torchrun variables of a caller's group
                 if not k.startswith(("TORCHELASTIC_", "MASTER_", "GROUP_", "ROLE_")) and k not in
                 ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    cores = host_cores(len(hosts))
    for rank, host in enumerate(hosts):
        environment = inherited | {"GLOO_SOCKET_IFNAME": host.device, "OMP_NUM_THREADS": "1"}
        command = [*on_host(host, cores[rank] if cores else None), sys.executable, "-m", "torch.distributed.run",
                   "--nnodes", "2", "--nproc-per-node", str(nproc_per_node), "--node-rank", str(rank),
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{hosts[0].address}:{port}",
                   "--rdzv-id", hosts[0].namespace, "--local-addr", host.address,
                   *(["--rdzv-conf", "is_host=1"] if rank == 0 else []),
                   "-m", "unison", "train", str(run_file), "--out", str(out), "--quiet", *extra]
        processes.append(subprocess.Popen(command, env=environment,
                                          stdout=subprocess.PIPE if output is None else output[rank],
                                          stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return processes



@dataclass
class TwoHostRun:
    """What ``train`` saw of one two-host job: rank 0's rounds and how the hosts ended."""

    records: list[dict] = field(default_factory=list)  # rank 0's history.jsonl, so far when stopped
    exit_codes: list[int | None] = field(default_factory=list)  # None: still running at the cap (killed)
    finished: bool = False    # rank 0 wrote its run directory
    seconds: float = 0.0      # from starting torchrun to the end (or the cap)
    failure: str | None = None  # the failed hosts' last output
    partial: Path | None = None  # rank 0's unfinished run directory, when it did not finish
    logs: list[Path] = field(default_factory=list)  # each host's output

    @property
    def capped(self) -> bool:
        return not self.finished and self.failure is None


def train(run_file: Path, out: Path, *, rate: str | None = None, cap: float = 600.0,
          nproc_per_node: int = 1) -> TwoHostRun:
    """Run ``unison train RUN_FILE --out OUT`` on two fresh hosts over a link of ``rate``
    (None: the unthrottled veth), stopped after ``cap`` seconds or as soon as a host fails
    (the other would only wait for it). Each host's output goes to OUT.host0.log and
    OUT.host1.log beside OUT; a run that did not finish leaves its partial directory there."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.parent / f"{out.name}.host{i}.log" for i in range(2)]
    logs = [open(path, "w") for path in paths]
    try:
        with two_hosts(rate) as hosts:
            started = time.monotonic()
            processes = torchrun_hosts(hosts, run_file, out, nproc_per_node=nproc_per_node, output=logs)
            while time.monotonic() - started < cap and any(p.poll() is None for p in processes) \
                    and not any(p.poll() for p in processes):
                time.sleep(0.2)
            seconds, codes = time.monotonic() - started, [p.poll() for p in processes]
    finally:  # leaving two_hosts killed whatever was still running in them
        for log in logs:
            log.close()
    finished = (out / "history.jsonl").is_file()
    partial = None if finished else next(iter(sorted(out.parent.glob(f".{out.name}.partial-*"))), None)
    history = out / "history.jsonl" if finished else (partial / "history.jsonl" if partial else None)
    records = _records(history) if history is not None and history.is_file() else []
    failure = None if finished or not any(codes) else "\n".join(
        path.read_text()[-1500:] for path, code in zip(paths, codes) if code)
    return TwoHostRun(records, codes, finished, seconds, failure, partial, paths)


def _records(history: Path) -> list[dict]:
    """A history's records; a last line cut off by the kill at the cap is left out."""
    records = []
    for line in history.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records
