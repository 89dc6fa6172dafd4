"""unison.linkmodel: the link spec, the collective time formulas against hand computations, the
collectives counted in history records against a sequential count of what a strategy makes,
and re-timed records."""

import math

import pytest

import unison
from unison.engine import records
from unison import linkmodel
from unison.errors import ConfigError
from unison.linkmodel import FRAMING, Link

PARAMS = 8 * 16 + 16 + 16 * 3 + 3  # conftest's small_model: mlp(8, [16], 3), no buffers


@pytest.mark.parametrize("text, bits, latency", [
    ("100mbit,20ms", 1e8, 0.02), ("1gbit", 1e9, 0.0), ("10Mbit, 0.5ms", 1e7, 5e-4), ("2.5gbit,100us", 2.5e9, 1e-4),
    (" 64kbit , 1s ", 64e3, 1.0), ("1e3mbit", 1e9, 0.0)])
def test_parse_reads_rates_and_latencies(text, bits, latency):
    link = linkmodel.parse(text)
    assert link.bits_per_s == pytest.approx(bits) and link.latency_s == pytest.approx(latency)
    assert linkmodel.parse(link.spec()) == link  # the spec reads back as the same link


@pytest.mark.parametrize("text", ["", "100", "100mb", "100mbps", "fast", "100mbit,20", "100mbit,20ms,3",
                                  "0mbit", "-5mbit", "100mbit,-1ms", None, 5, "mbit"])
def test_parse_refuses_with_the_field_and_the_accepted_forms(text):
    with pytest.raises(ConfigError) as caught:
        linkmodel.parse(text)
    message = str(caught.value)
    assert message.startswith("link") and "accepted" in message and "100mbit,20ms" in message


def test_spec_is_the_normal_form():
    assert Link(1e8, 0.02).spec() == "100mbit,20ms" and Link(1e9).spec() == "1gbit"
    assert Link(2.5e6, 1e-4).spec() == "2.5mbit,100us"


def test_collective_times_equal_a_hand_computation():
    link = linkmodel.parse("1gbit,1ms")
    beta = 1e9 / 8 / (1514 / 1448)  # payload bytes per second
    B = 1e6
    # ring all-reduce on 4: 6 steps of B/4, each a latency and B/4 on the wire
    assert linkmodel.collective_seconds("all_reduce", B, 4, link) == pytest.approx(6 * (1e-3 + B / 4 / beta))
    # on 2: two steps of B/2, i.e. 2α + B/β
    assert linkmodel.collective_seconds("all_reduce", B, 2, link) == pytest.approx(2e-3 + B / beta)
    # ring all-gather on 4: 3 steps of one worker's B
    assert linkmodel.collective_seconds("all_gather", B, 4, link) == pytest.approx(3 * (1e-3 + B / beta))
    # binomial-tree broadcast: ceil(log2 N) rounds of B
    assert linkmodel.collective_seconds("broadcast", B, 4, link) == pytest.approx(2 * (1e-3 + B / beta))
    assert linkmodel.collective_seconds("broadcast", B, 5, link) == pytest.approx(3 * (1e-3 + B / beta))
    assert linkmodel.collective_seconds("barrier", 0, 8, link) == pytest.approx(3e-3)
    assert linkmodel.collective_seconds("send", B, 8, link, calls=2) == pytest.approx(2e-3 + B / beta)
    # calls add: 10 all-reduces of 1 kB each = 10 latency terms + 10 kB of bandwidth
    assert linkmodel.collective_seconds("all_reduce", 1e4, 2, link, calls=10) == pytest.approx(20e-3 + 1e4 / beta)
    assert linkmodel.collective_seconds("all_reduce", B, 1, link) == 0.0  # alone, nothing is sent
    assert FRAMING == pytest.approx(1514 / 1448)


def test_predict_retimes_each_round_from_compute_and_modelled_collectives():
    link = linkmodel.parse("8mbit,10ms")
    beta = 1e6 / FRAMING
    records = [
        {"epoch": 0.5, "wall_s": 3.0, "startup_s": 1.0, "comm_s": 0.5, "collectives": {"all_reduce": [4, 4000]}},
        {"epoch": 1.0, "wall_s": 4.0, "startup_s": 1.0, "comm_s": 0.25, "collectives": {"all_reduce": [4, 4000]},
         "bookkeeping": {"all_reduce": [1, 48]}},
    ]
    first = 1.0 + (2.0 - 0.5) + 4 * 2 * 0.01 + 4000 / beta
    second = first + (1.0 - 0.25) + 5 * 2 * 0.01 + 4048 / beta
    assert linkmodel.predict(records, 2, link, floor=False) == pytest.approx([first, second])
    assert linkmodel.epoch_seconds(records) == pytest.approx(3.0)
    bare = linkmodel.predict(records, 2, link, floor=False)
    assert linkmodel.epoch_seconds(records, bare) == pytest.approx(second - 1.0)
    # with the floor, no call is faster than where it was measured: round 1's calls took 0.125 s
    # each (more than the link's 0.021), round 2's 0.05 s each (the bookkeeping's 48 B too)
    call = 2 * 0.01 + 1000 / beta
    first = 1.0 + (2.0 - 0.5) + 4 * max(call, 0.5 / 4)
    second = first + (1.0 - 0.25) + 4 * max(call, 0.25 / 5) + max(2 * 0.01 + 48 / beta, 0.25 / 5)
    assert linkmodel.predict(records, 2, link) == pytest.approx([first, second])
    # on a slow enough link the floor is below every call's modelled time: no change
    slow = linkmodel.parse("8kbit,10ms")
    assert linkmodel.predict(records, 2, slow) == pytest.approx(linkmodel.predict(records, 2, slow, floor=False))
    # a stacked process's comm_s is its in-process sums over rows, no worker's collective: no floor
    stacked = [r | {"stacked_rows": 2} for r in records]
    assert linkmodel.predict(stacked, 2, link) == pytest.approx(linkmodel.predict(stacked, 2, link, floor=False))
    assert linkmodel.round_seconds(records[0], 1, link) == 0.0  # alone, nothing is sent
    # a stacked process of 4 rows: each separate worker computes a quarter
    stacked = [r | {"stacked_rows": 4} for r in records]
    assert linkmodel.compute_seconds(stacked) == pytest.approx([1.5 / 4, 0.75 / 4])
    assert linkmodel.predict([{"wall_s": 1.0}], 2, link) is None  # a history from before the counts


def fit(blobs, small_model, strategy, backend="threads", **kwargs):
    return unison.fit(small_model, blobs, val=0.25, strategy=strategy, workers=2, backend=backend, epochs=2,
                      batch_size=4, lr=0.05, progress=False, **kwargs)


ROW = records.COLUMNS * 8  # one round's sums, float64


def flushes(history):
    """Where each epoch's records are summed (one all-reduce of [rounds, COLUMNS] float64), counted
    in the next round: record index -> its payload."""
    out, pending = {}, 0
    for i, record in enumerate(history):
        pending += 1
        if record["epoch"] == int(record["epoch"]) and i + 1 < len(history):
            out[i + 1], pending = ROW * pending, 0
    return out


def test_sync_counts_one_all_reduce_a_step(blobs, small_model):
    result = fit(blobs, small_model, "sync")
    # comm_bytes counts the start broadcast too (rank 0 sends the start weights); the records' counts
    # begin with training
    history, previous, before = result.history, 0, PARAMS * 4
    assert [r["epoch"] for r in history] == [1.0, 2.0]
    books = flushes(history)
    for i, record in enumerate(history):
        steps = record["step"] - previous
        # a weighted mean: the gradient and its weight, float32; no buffers, so no merge at the round end
        assert record["collectives"] == {"all_reduce": [steps, steps * (PARAMS + 1) * 4]}
        assert record.get("bookkeeping") == ({"all_reduce": [1, books[i]]} if i in books else None)
        assert record["comm_bytes"] - before == steps * (PARAMS + 1) * 4  # 2(N-1)/N·B with N=2
        assert 0 <= record["comm_s"] < record["wall_s"]
        previous, before = record["step"], record["comm_bytes"]


def test_periodic_counts_one_all_reduce_a_round(blobs, small_model):
    result = fit(blobs, small_model, "periodic(every=3)")
    history = result.history
    steps = [r["step"] for r in history]
    assert steps == list(range(3, steps[-1] + 1, 3)) and len(steps) >= 4  # rounds of 3 steps
    books = flushes(history)
    assert list(books.values()) == [ROW * 3]  # the first epoch's three rounds, summed in one all-reduce
    for i, record in enumerate(history):
        assert record["collectives"] == {"all_reduce": [1, (PARAMS + 1) * 4]}
        assert record.get("bookkeeping") == ({"all_reduce": [1, books[i]]} if i in books else None)


def test_stacked_counts_what_separate_workers_would_send(blobs, small_model):
    flat = fit(blobs, small_model, "periodic(every=3)")
    stacked = fit(blobs, small_model, "periodic(every=3)", backend="stacked")
    assert [r["collectives"] for r in stacked.history] == [r["collectives"] for r in flat.history]
    assert [r.get("bookkeeping") for r in stacked.history] == [r.get("bookkeeping") for r in flat.history]
    assert stacked.history[-1]["comm_bytes"] == 0  # rows of one process exchange nothing
    assert all(r["stacked_rows"] == 2 for r in stacked.history) and "stacked_rows" not in flat.history[0]


def test_compressed_sync_counts_the_compressed_payload(blobs, small_model):
    result = fit(blobs, small_model, "sync(compress=fp16)")
    record = result.history[0]
    steps = record["step"]
    # fp16: at the first step a 4-byte all-reduce of the weights, then the gradient in 2 bytes a
    # value; from the second step one all-reduce of the gradient and the weight
    assert record["collectives"] == {"all_reduce": [steps + 1, 4 + steps * 2 * (PARAMS + 1) - 2]}
    assert math.isfinite(record["comm_s"])


def test_the_bench_check_predicts_from_the_unthrottled_run_and_flags_large_errors():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "bench" / "link_model_check.py"
    spec = importlib.util.spec_from_file_location("link_model_check", path)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    # the unthrottled run: 2 epochs of 1 s compute + 0.1 s in 100 all-reduces of 1 MB: 1 ms a call
    records = [{"epoch": e, "wall_s": 1.0 + 1.1 * e, "startup_s": 1.0, "comm_s": 0.1,
                "collectives": {"all_reduce": [100, 100 * 10**6]}} for e in (1, 2)]
    base = {"model": "m", "strategy": "sync", "rate": "veth", "records": records, "s_per_epoch": 1.1}
    beta = 1e8 / 8 / FRAMING
    bare = 1.0 + 100 * 10**6 / beta  # compute + the bytes: each call (80 ms) above the 1 ms floor
    fast = 1.0 + 100 * max(10**6 / (1e11 / 8 / FRAMING), 1e-3)  # at 100 Gbit/s the floor decides
    runs = [base, {"model": "m", "strategy": "sync", "rate": "100mbit", "s_per_epoch": bare * 1.1},
            {"model": "m", "strategy": "sync", "rate": "10mbit", "s_per_epoch": 1.0},
            {"model": "m", "strategy": "sync", "rate": "100gbit", "s_per_epoch": 1.1}]
    rows = check.check(runs, runs, 0.25)
    assert rows[0]["per_call_ms"] == pytest.approx(1.0)
    assert check.per_call_ms([{"comm_s": 0.3, "messages": {"up": [2, 8], "down": [2, 8]}}]) is None  # fedbuff
    assert rows[0]["predicted_s"] == pytest.approx(bare) and rows[0]["bare_s"] == pytest.approx(bare)
    assert rows[0]["predicted_error"] == pytest.approx(1 / 1.1 - 1) and not rows[0]["flag"]
    assert rows[1]["flag"]  # 10 Mbit/s: 80 s of bytes predicted against 1 s measured
    assert rows[2]["predicted_s"] == pytest.approx(fast) and rows[2]["bare_s"] < fast and not rows[2]["flag"]
    table = check.markdown(rows, 0.25)
    assert "1 of 3 predictions off by more than 25%" in table and "Bare: 1 of 3" in table
    # a run stopped after its first round is read from its first to its last round (bench/link.py):
    # so is the baseline, over the same rounds; with one round there is no such span
    three = [{"epoch": e, "wall_s": 1.0 + e + (0.5 if e > 1 else 0.0), "startup_s": 1.0, "comm_s": 0.0,
              "collectives": {"all_reduce": [1, 8]}} for e in (1, 2, 3)]
    stopped = {"model": "m", "strategy": "s", "rate": "1gbit", "s_per_epoch": 1.5,
               "s_per_epoch_from": "first to last round", "records": three[:2], "capped": True}
    (row,) = check.check([stopped], [{"model": "m", "strategy": "s", "rate": "veth", "records": three}], 0.25)
    assert row["baseline_s"] == pytest.approx(1.5) and row["predicted_s"] == pytest.approx(1.5, rel=1e-3)
    assert check.check([stopped | {"records": three[:1]}],
                       [{"model": "m", "strategy": "s", "rate": "veth", "records": three}], 0.25)[0]["predicted_s"] is None


def test_an_asynchronous_round_is_the_workers_pace_or_the_servers_link_whichever_is_slower():
    link = Link(8e6 * FRAMING, 0.001)   # 1e6 payload bytes a second, 1 ms a message
    record = {"arrivals": [[0, 0, 0]] * 4, "messages": {"up": [4, 40_000], "down": [4, 40_000]}}
    # workers' pace: 4 arrivals of 2 workers, each cycle longer by 2 ms + 20 ms
    assert linkmodel.asynchronous_round_seconds(record, 1.0, 2, link) == pytest.approx(1.0 + 2 * 0.022)
    # the server's link: 4 messages of 10 kB in (and out) at 1e6 B/s, + 1 ms, when compute is nothing
    assert linkmodel.asynchronous_round_seconds(record, 0.0, 2, link) == pytest.approx(max(2 * 0.022, 0.041))
    assert linkmodel.asynchronous_round_seconds(record, 0.0, 64, link) == pytest.approx(0.041)


def test_fedbuff_records_count_the_servers_messages_and_retime_on_a_link(blobs, small_model):
    result = unison.fit(small_model, blobs, strategy="fedbuff(every=3, buffer=2)", workers=3, backend="threads",
                        epochs=2, batch_size=8, lr=0.1, progress=False, val=None)
    history = result.history
    state = PARAMS  # no buffers: the state vector is the parameters
    up = [r["messages"]["up"] for r in history]
    assert [k for k, _ in up] == [len(r["arrivals"]) for r in history]
    assert all(b == k * (6 * 8 + 4 * state) for k, b in up)  # meta (6 float64) and the change
    down = [r["messages"]["down"] for r in history]
    assert all(b == k * (4 * state + 8) for k, b in down)     # the model and its version (float64)
    assert sum(k for k, _ in up) - 1 <= sum(k for k, _ in down) <= sum(k for k, _ in up)
    assert linkmodel.asynchronous(history) and linkmodel.modelled(history)
    slow = linkmodel.predict(history, 3, linkmodel.parse("1mbit,10ms"))
    assert slow is not None and all(s >= r["wall_s"] for s, r in zip(slow, history))
    assert slow[-1] - history[-1]["wall_s"] > sum(k for k, _ in up) / 3 * 0.02  # every cycle's round trip
