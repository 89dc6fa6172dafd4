import pytest
import torch

from unison.errors import ConfigError, DataError
from unison.partitions import Dirichlet, Explicit, Full, Shard, describe, parse

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


LABELS = torch.arange(300) % 10  # 10 classes, 30 samples each


def test_dirichlet_splits_every_sample_once_and_is_reproducible_from_the_seed():
    bound = Dirichlet(0.5).bind(LABELS, 4, seed=3)
    shares = [bound.indices(300, 4, r, 0, 3) for r in range(4)]
    assert torch.equal(torch.cat(shares).sort().values, torch.arange(300))
    assert bound.sizes(300, 4) == [len(s) for s in shares]
    again = Dirichlet(0.5).bind(LABELS, 4, seed=3)
    assert all(torch.equal(a.sort().values, b.sort().values)
               for a, b in zip(shares, [again.indices(300, 4, r, 1, 3) for r in range(4)]))
    other = Dirichlet(0.5).bind(LABELS, 4, seed=4)
    assert bound.sizes(300, 4) != other.sizes(300, 4)


def _classes_per_worker(alpha, workers=5, seed=0):
    bound = Dirichlet(alpha).bind(LABELS, workers, seed)
    return [len(LABELS[bound.indices(300, workers, r, 0, seed)].unique()) for r in range(workers)]


def test_dirichlet_alpha_sets_the_label_skew():
    # Hsu et al.: alpha -> 0 gives each worker few classes, alpha -> inf the global mix.
    mean_classes = {alpha: sum(_classes_per_worker(alpha)) / 5 for alpha in (0.05, 0.3, 1000.0)}
    assert mean_classes[0.05] <= 5 < mean_classes[0.3] < mean_classes[1000.0] == 10
    bound = Dirichlet(1000.0).bind(LABELS, 5, 0)
    for r in range(5):
        counts = torch.bincount(LABELS[bound.indices(300, 5, r, 0, 0)], minlength=10)
        assert int(counts.min()) >= 4 and int(counts.max()) <= 8  # 6 expected per class


def test_describe_counts_classes_per_worker():
    text = describe("dirichlet(0.1)", LABELS, workers=3, seed=1)
    lines = text.splitlines()
    assert lines[0].startswith("partition dirichlet(alpha=0.1), 3 workers")
    assert lines[1].split() == ["worker"] + [str(c) for c in range(10)] + ["total", "classes"]
    rows = [list(map(int, line.split())) for line in lines[2:]]
    assert [r[0] for r in rows] == [0, 1, 2]
    assert sum(r[11] for r in rows) == 300
    for r in rows:
        assert sum(r[1:11]) == r[11] and r[12] == sum(c > 0 for c in r[1:11])
    shard = describe("shard", LABELS, workers=3)
    assert "partition shard" in shard and len(shard.splitlines()) == 5


def test_dirichlet_refuses_bad_alpha_regression_targets_and_empty_workers():
    with pytest.raises(ConfigError, match="dirichlet.alpha=0"):
        parse("dirichlet(0)")
    with pytest.raises(ConfigError, match="integer class labels"):
        Dirichlet(1.0).bind(torch.randn(20), 2, 0)
    with pytest.raises(DataError, match="larger alpha"):
        Dirichlet(0.001).bind(torch.arange(6) % 2, 6, 0)
    with pytest.raises(ConfigError, match="bind"):
        Dirichlet(1.0).sizes(10, 2)


def test_fit_draws_dirichlet_shares_from_the_training_labels(blobs, small_model):
    import unison
    result = unison.fit(small_model, blobs, strategy="periodic", partition="dirichlet(0.3)", workers=3,
                        backend="threads", epochs=2, batch_size=8, val=None, progress=False)
    assert result.config.partition.spec() == "dirichlet(alpha=0.3)"
    assert result.history[-1]["samples"] == 2 * 96  # every sample, once per epoch
    assert result.config.partition.sizes(96, 3) == Dirichlet(0.3).bind(blobs[1], 3, 0).sizes(96, 3)


def test_parse_specs_with_options():
    assert parse("dirichlet(alpha=0.2)") == Dirichlet(0.2)
    assert parse(" dirichlet( 0.2 ) ").alpha == 0.2
    with pytest.raises(ConfigError, match="'shard', 'full', 'dirichlet'"):
        parse("iid")
