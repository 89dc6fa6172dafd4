"""Communicators: the threads one against the pure merge functions, and its failure path."""

import threading
import time

import pytest
import torch

from unison import merges
from unison.comm.base import PeerFailed, Solo
from unison.comm.threads import ThreadComm, ThreadGroup


def run_ranks(world_size, body, timeout=30.0):
    group = ThreadGroup(world_size, timeout)
    results, errors = [None] * world_size, [None] * world_size

    def work(rank):
        try:
            results[rank] = body(ThreadComm(group, rank))
        except BaseException as exc:  # noqa: BLE001
            errors[rank] = exc
            group.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


def states(world_size):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(1000, generator=g) for _ in range(world_size)]


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_all_reduce_mean_equals_weighted_mean_and_is_identical_everywhere(world_size):
    values, weights = states(world_size), [float(w) for w in range(1, world_size + 1)]
    results, errors = run_ranks(world_size, lambda c: c.all_reduce_mean(values[c.rank].clone(), weights[c.rank]))
    assert errors == [None] * world_size
    expected = merges.weighted_mean(values, weights)
    assert torch.allclose(results[0], expected, atol=1e-6)
    assert all(torch.equal(r, results[0]) for r in results)  # bit-identical on every rank


def test_all_reduce_sum_is_in_rank_order_and_repeatable():
    values = states(4)
    first, _ = run_ranks(4, lambda c: c.all_reduce_sum(values[c.rank].clone()))
    again, _ = run_ranks(4, lambda c: c.all_reduce_sum(values[c.rank].clone()))
    in_order = values[0].clone()
    for v in values[1:]:
        in_order += v
    assert torch.equal(first[0], in_order) and torch.equal(again[2], in_order)


def test_gather_broadcast_and_byte_counts():
    values = states(3)

    def body(comm):
        gathered = comm.all_gather(values[comm.rank])
        box = values[comm.rank].clone()
        comm.broadcast(box, src=2)
        obj = comm.broadcast_object({"rank": comm.rank}, src=1)
        comm.all_reduce_sum(box)
        return gathered, box, obj, comm.bytes_sent

    results, errors = run_ranks(3, body)
    assert errors == [None] * 3
    for rank, (gathered, box, obj, sent) in enumerate(results):
        assert all(torch.equal(g, v) for g, v in zip(gathered, values))
        assert torch.allclose(box, values[2] * 3)
        assert obj == {"rank": 1}
        # all-gather 2·4000 B, broadcast 4000 B on the source only, all-reduce 2·(2/3)·4000 B
        assert sent == 8000 + (4000 if rank == 2 else 0) + 2 * 2 * 4000 // 3


def test_zero_weights_everywhere_give_zeros_not_nan():
    results, _ = run_ranks(2, lambda c: c.all_reduce_mean(torch.ones(4), 0.0))
    assert torch.equal(results[0], torch.zeros(4))


def test_a_failing_rank_wakes_the_others_instead_of_hanging():
    def body(comm):
        if comm.rank == 1:
            raise ValueError("rank 1 broke")
        return comm.all_reduce_sum(torch.ones(3))

    started = time.monotonic()
    _, errors = run_ranks(3, body, timeout=60.0)
    assert time.monotonic() - started < 5
    assert isinstance(errors[1], ValueError)
    assert isinstance(errors[0], PeerFailed) and isinstance(errors[2], PeerFailed)


def test_a_rank_that_never_arrives_times_out():
    results, errors = run_ranks(2, lambda c: c.all_reduce_sum(torch.ones(1)) if c.rank == 0 else None,
                                timeout=0.5)
    assert isinstance(errors[0], PeerFailed) and "timed out after 0.5 s" in str(errors[0])


def test_solo_is_the_identity():
    comm = Solo()
    t = torch.arange(4.0)
    assert comm.all_reduce_mean(t.clone(), 3.0).equal(t) and comm.all_gather(t)[0].equal(t)
    assert comm.bytes_sent == 0
