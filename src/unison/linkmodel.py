"""The link model: a run's time on a network it did not run on, from what it measured and sent.

A link is a bandwidth β and a latency α, given as ``"100mbit,20ms"`` (``unison compare --link``).
One collective of payload B (bytes per worker) among N workers costs a·α + b/β, with (a, b) for
the algorithms gloo and NCCL use (Thakur, Rabenseifner & Gropp 2005, "Optimization of Collective
Communication Operations in MPICH"; Patarasuk & Yuan 2009, "Bandwidth optimal all-reduce
algorithms for clusters of workstations"):

- all-reduce, ring (reduce-scatter, then all-gather): 2(N−1) steps of B/N each:
  a = 2(N−1), b = 2(N−1)/N · B
- all-gather, ring: N−1 steps of one worker's B: a = N−1, b = (N−1) · B
- broadcast, binomial tree (gloo's): ⌈log₂ N⌉ rounds of B: a = b/B = ⌈log₂ N⌉
- barrier (dissemination): a = ⌈log₂ N⌉, b = 0
- send (point to point, asynchronous strategies): a = 1, b = B; the sender's view only, so an
  asynchronous run's prediction is rougher than a synchronous one's

Bytes on the wire are the payload × FRAMING (TCP/IPv4 with timestamps over Ethernet at MTU
1500: 1514 bytes a frame for 1448 of payload); both directions of a link run at β at once.

A round's predicted time = its measured compute (wall time − the seconds spent inside
collectives on this run, ``comm_s``; a stacked process's compute divided by its rows, as if
each replica had a worker of its own) + the modelled time of its collectives (the strategy's
and unison's bookkeeping, counted in the history records by unison.comm.base.Traffic).

Start-up is kept as measured. Predicted time to accuracy: the run's accuracy curve with
every round re-timed so. Pure functions of history records; nothing here trains.

Each modelled collective costs at least the mean time of the round's collectives where it was
measured (its comm_s over its calls): the link modelled is slower than the one measured on
(loopback, a veth pair), and what a collective costs besides its bytes — waking the threads
that wait for it on both ends, waiting for the slower replica — does not go away on a slower
link. On the project's 2-vCPU VM, over an idle veth pair, all-reduces back to back took 2.3-3.7
ms each at the median from 8 KB to 1.36 MB, and 0.6-2.9 ms after 5 ms of compute
(bench/collectives.py): as much as 340 KB take at 1 Gbit/s; without the floor the model read
28-35% fast at 1 Gbit/s (bench/RESULTS.md). Its limits: a round that mixes large and small
calls gets the mean as every call's floor, which over-predicts (unison's rounds are one kind of
call, a step's or a merge's, and a few small bookkeeping ones); runs measured on a link slower
than the one modelled are predicted too slow; a stacked process's records get none (its
in-process sums are no link's cost); fedbuff's rounds are modelled from their messages, without
it. ``floor=False`` leaves it out.

An asynchronous run (fedbuff; Nguyen et al. 2022) has no collectives in step: its record is one
server step after K arrivals, each a worker's message of S bytes up and the server's reply of R
bytes down (``messages``: up and down, [count, bytes]). On the link every worker's cycle grows
by its own round trip, 2α + (S + R)/β, and the server's link carries the K messages in and the K
replies out at once, so a round takes max(measured + K/N · (2α + (S + R)/β), K · max(S, R)/β + α):
the workers' pace, or the server's link, whichever is slower. The measured round is the server's
wall time between its steps (over loopback the messages themselves cost next to nothing).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import ConfigError

RATES = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
TIMES = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
FRAMING = 1514 / 1448
ACCEPTED = ("'RATE' or 'RATE,LATENCY': RATE a number with kbit, mbit or gbit (bits per second, "
            "as tc writes them), LATENCY a number with ms, us or s; e.g. '100mbit,20ms' or '1gbit'")
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?"
_PART = re.compile(rf"^\s*({_NUMBER})\s*([a-z]+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Link:
    """A network link: ``bits_per_s`` each way and a one-way ``latency_s`` per message."""

    bits_per_s: float
    latency_s: float = 0.0

    @property
    def payload_bytes_per_s(self) -> float:
        return self.bits_per_s / 8.0 / FRAMING

    def spec(self) -> str:
        """The link as ``parse`` reads it, e.g. '100mbit,20ms'."""
        unit = next(u for u in ("tbit", "gbit", "mbit", "kbit", "bit") if self.bits_per_s >= RATES[u] or u == "bit")
        rate = f"{self.bits_per_s / RATES[unit]:g}{unit}"
        if not self.latency_s:
            return rate
        scale = next(u for u in ("s", "ms", "us") if self.latency_s >= TIMES[u] or u == "us")
        return f"{rate},{self.latency_s / TIMES[scale]:g}{scale}"


def _value(text: str, units: Mapping[str, float], field: str, what: str) -> float:
    found = _PART.match(text)
    unit = found.group(3).lower() if found else None
    if unit not in units:
        raise ConfigError(f"{field}: {what} {text.strip()!r} is not understood; accepted: {ACCEPTED}")
    return float(found.group(1)) * units[unit]


def parse(text: Any, field: str = "link") -> Link:
    """``"100mbit,20ms"`` → Link(1e8, 0.02); ConfigError naming ``field`` on anything else."""
    if isinstance(text, Link):
        return text
    if not isinstance(text, str) or not text.strip() or text.count(",") > 1:
        raise ConfigError(f"{field}: got {text!r}; accepted: {ACCEPTED}")
    rate, _, latency = text.partition(",")
    bits = _value(rate, RATES, field, "rate")
    delay = _value(latency, TIMES, field, "latency") if latency.strip() else 0.0
    if not bits > 0 or not math.isfinite(bits) or not math.isfinite(delay):
        raise ConfigError(f"{field}: the rate must be above 0 and both numbers finite, got {text!r}; "
                          f"accepted: {ACCEPTED}")
    return Link(bits, delay)


def terms(kind: str, payload: float, world: int, calls: int = 1) -> tuple[float, float]:
    """(a, b) of ``calls`` collectives of ``kind`` with ``payload`` bytes per worker in all: their
    time on a link is a·α + b·FRAMING/β (see the module docstring)."""
    n = world
    if n <= 1:
        return 0.0, 0.0
    depth = math.ceil(math.log2(n))
    if kind == "all_reduce":
        return 2 * (n - 1) * calls, 2 * (n - 1) / n * payload
    if kind == "all_gather":
        return (n - 1) * calls, (n - 1) * payload
    if kind == "broadcast":
        return depth * calls, depth * payload
    if kind == "barrier":
        return depth * calls, 0.0
    if kind == "send":  # point to point (asynchronous strategies): one message each
        return calls, payload
    raise ValueError(f"no model of a collective {kind!r}")


def seconds(a: float, b: float, link: Link) -> float:
    return a * link.latency_s + b / link.payload_bytes_per_s


def collective_seconds(kind: str, payload: float, world: int, link: Link, calls: int = 1) -> float:
    """The modelled time of ``calls`` collectives of ``kind`` (``payload`` bytes per worker in all)."""
    return seconds(*terms(kind, payload, world, calls), link)


def calls(record: Mapping[str, Any]) -> int:
    """How many collectives a round made, the strategy's and the bookkeeping's."""
    return sum(int(c) for table in (record.get("collectives"), record.get("bookkeeping"))
               for c, _ in (table or {}).values())


def measured_per_call(record: Mapping[str, Any]) -> float:
    """The mean seconds of the round's collectives where it was measured (its ``comm_s`` over its
    calls): the floor of each modelled one. 0 for a stacked process (``stacked_rows``): its
    in-process sums over rows are no worker's collective."""
    made = calls(record)
    if not made or int(record.get("stacked_rows", 1)) > 1:
        return 0.0
    return float(record.get("comm_s", 0.0)) / made


def round_seconds(record: Mapping[str, Any], world: int, link: Link, floor: bool = True) -> float:
    """The modelled time of one round's collectives, the strategy's and the bookkeeping's: each
    call a·α + b/β for its share of the payload, but no less than the round's calls took on
    average where it was measured (``floor``; see the module docstring). Alone, nothing is sent."""
    if world <= 1:
        return 0.0
    least = measured_per_call(record) if floor else 0.0
    total = 0.0
    for table in (record.get("collectives"), record.get("bookkeeping")):
        for kind, (count, payload) in (table or {}).items():
            if count:
                total += count * max(collective_seconds(kind, payload / count, world, link), least)
    return total


def modelled(records: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the records carry what the model needs: counts (histories before them have
    none; an asynchronous run's, its messages), and no declared ``speeds=`` (a fast worker's
    wait for a slow one is inside its collectives, and compute = wall − comm_s would erase it)."""
    needed = "messages" if asynchronous(records) else "collectives"
    return bool(records) and all("comm_s" in r and needed in r and "simulated_wait_s" not in r for r in records)


def asynchronous(records: Sequence[Mapping[str, Any]]) -> bool:
    """Whether these are a buffered asynchronous server's records (their rounds name arrivals)."""
    return bool(records) and "arrivals" in records[0]


def asynchronous_round_seconds(record: Mapping[str, Any], measured: float, workers: int, link: Link) -> float:
    """One server step of an asynchronous run on ``link`` (see the module docstring)."""
    (k, up), (replies, down) = record["messages"]["up"], record["messages"]["down"]
    if not k:
        return measured
    size_up = up / k
    size_down = down / replies if replies else size_up  # a round's last reply leaves after its record
    trip = 2 * link.latency_s + (size_up + size_down) / link.payload_bytes_per_s
    server = k * max(size_up, size_down) / link.payload_bytes_per_s + link.latency_s
    return max(measured + k / max(workers, 1) * trip, server)


def compute_seconds(records: Sequence[Mapping[str, Any]]) -> list[float]:
    """Each round's measured compute per worker: its wall time − its seconds in collectives, a
    stacked process's divided by its rows (``stacked_rows``)."""
    previous, out = float(records[0].get("startup_s", 0.0)) if records else 0.0, []
    for record in records:
        spent = float(record["wall_s"]) - previous - float(record["comm_s"])
        out.append(max(spent, 0.0) / int(record.get("stacked_rows", 1)))
        previous = float(record["wall_s"])
    return out


def predict(records: Sequence[Mapping[str, Any]], world: int, link: Link, floor: bool = True) -> list[float] | None:
    """The records' wall_s as they would be on ``link``: start-up as measured, then each round's
    compute + its modelled collectives (``floor``: none faster than measured). None when the
    records lack the counts."""
    if not modelled(records):
        return None
    clock, out = float(records[0].get("startup_s", 0.0)), []
    if asynchronous(records):  # world: the workers (the server rank is not counted)
        previous = clock
        for record in records:
            clock += asynchronous_round_seconds(record, max(float(record["wall_s"]) - previous, 0.0), world, link)
            previous = float(record["wall_s"])
            out.append(clock)
        return out
    for record, compute in zip(records, compute_seconds(records)):
        clock += compute + round_seconds(record, world, link, floor)
        out.append(clock)
    return out


def retimed(records: Sequence[Mapping[str, Any]], world: int, link: Link, floor: bool = True) -> list[dict[str, Any]] | None:
    """The records with wall_s replaced by their predicted times on ``link`` (None: no counts)."""
    walls = predict(records, world, link, floor)
    return None if walls is None else [dict(r) | {"wall_s": w} for r, w in zip(records, walls)]


def epoch_seconds(records: Sequence[Mapping[str, Any]], walls: Sequence[float] | None = None) -> float | None:
    """Training time per epoch (start-up excluded), from the records' wall_s or from ``walls``."""
    if not records or not records[-1].get("epoch"):
        return None
    last = walls[-1] if walls is not None else float(records[-1]["wall_s"])
    return (last - float(records[0].get("startup_s", 0.0))) / float(records[-1]["epoch"])
