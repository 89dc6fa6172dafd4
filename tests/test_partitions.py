import pytest
import torch

from unison.partitions import Explicit, Full, Shard, parse

from reference import sampler_order


@pytest.mark.parametrize("n", [10, 97, 100])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_is_distributed_sampler(n, world_size):
    for epoch in range(3):
        for rank in range(world_size):
            mine = Shard().indices(n, world_size, rank, epoch, seed=5)
            assert torch.equal(mine, sampler_order(n, world_size, rank, epoch, seed=5))
    assert Shard().sizes(n, world_size) == [n // world_size] * world_size


def test_shards_are_disjoint_and_change_every_epoch():
    parts = [Shard().indices(100, 4, r, 0, 0) for r in range(4)]
    assert len(torch.cat(parts).unique()) == 100
    assert not torch.equal(Shard().indices(100, 4, 0, 0, 0), Shard().indices(100, 4, 0, 1, 0))


def test_full_gives_every_replica_everything_in_its_own_order():
    orders = [Full().indices(50, 3, r, 0, 0) for r in range(3)]
    for order in orders:
        assert torch.equal(order.sort().values, torch.arange(50))
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    assert torch.equal(Full().indices(50, 1, 0, 2, 0), Shard().indices(50, 1, 0, 2, 0))


def test_explicit_keeps_each_share_and_reports_sizes():
    part = Explicit([[0, 1, 2, 3], [7, 8]])
    assert part.sizes(10, 2) == [4, 2]
    assert sorted(part.indices(10, 2, 1, 0, 0).tolist()) == [7, 8]
    assert part.spec() == "explicit(4/2)"


def test_parse_names_and_objects():
    assert isinstance(parse("shard"), Shard) and isinstance(parse("full"), Full)
    obj = Full()
    assert parse(obj) is obj
