import pytest
import torch

from unison.errors import ConfigError
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


def test_dirichlet_gives_equal_disjoint_shares_reproducible_from_the_seed():
    bound = Dirichlet(0.5).bind(LABELS, 4, seed=3)
    shares = [bound.indices(300, 4, r, 0, 3) for r in range(4)]
    assert torch.equal(torch.cat(shares).sort().values, torch.arange(300))  # 300 // 4 each, none left
    assert bound.sizes(300, 4) == [75] * 4
    again = Dirichlet(0.5).bind(LABELS, 4, seed=3)
    next_epoch = [again.indices(300, 4, r, 1, 3) for r in range(4)]
    assert all(torch.equal(a.sort().values, b.sort().values) for a, b in zip(shares, next_epoch))
    assert not all(torch.equal(a, b) for a, b in zip(shares, next_epoch))  # reshuffled every epoch
    other = Dirichlet(0.5).bind(LABELS, 4, seed=4)
    assert not torch.equal(other.indices(300, 4, 0, 0, 4).sort().values, shares[0].sort().values)


def _classes_per_worker(alpha, workers=5, seed=0):
    bound = Dirichlet(alpha).bind(LABELS, workers, seed)
    return [len(LABELS[bound.indices(300, workers, r, 0, seed)].unique()) for r in range(workers)]


def _mean_classes(alpha):
    return sum(sum(_classes_per_worker(alpha, seed=seed)) for seed in range(4)) / 20


def test_dirichlet_alpha_sets_the_label_skew():
    # Hsu et al.: a worker's class mix is Dir(alpha·p): alpha -> 0 gives few classes, alpha -> inf the global mix.
    few, some, nearly_all = _mean_classes(0.1), _mean_classes(10.0), _mean_classes(1000.0)
    assert few <= 4 < some < nearly_all and nearly_all >= 9.5
    bound = Dirichlet(0.05).bind(LABELS, 5, 0)
    skewed = torch.bincount(LABELS[bound.indices(300, 5, 0, 0, 0)], minlength=10)
    assert int(skewed.max()) >= 30  # one class makes up at least half of worker 0's 60 samples


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
    with pytest.raises(ConfigError, match="finite number > 0"):
        parse("dirichlet(inf)")
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


def test_pathological_gives_each_worker_k_label_sorted_shards(blobs):
    from unison.partitions import Pathological

    bound = Pathological(2).bind(LABELS, 5, seed=1)  # 10 shards of 30: one class each
    shares = [bound.indices(300, 5, r, 0, 1) for r in range(5)]
    assert torch.equal(torch.cat(shares).sort().values, torch.arange(300))  # disjoint, all used
    assert [len(LABELS[s].unique()) for s in shares] == [2] * 5
    assert bound.sizes(300, 5) == [60] * 5
    assert parse("pathological(3)").k == 3 and parse(bound.spec()) == Pathological(2)
    uneven = Pathological(2).bind(LABELS[:293], 4, seed=1)  # 8 shards of 36 (5 left out), straddling classes
    for rank in range(4):
        mine = uneven.indices(293, 4, rank, 0, 1)
        # classes of ~29 samples: a shard of 36 label-sorted samples meets at most three of them
        assert len(mine) == 72 and len(LABELS[mine].unique()) <= 6
    again = Pathological(2).bind(LABELS, 5, seed=1)
    assert all(torch.equal(a.sort().values, again.indices(300, 5, r, 1, 1).sort().values) for r, a in enumerate(shares))
    assert not torch.equal(Pathological(2).bind(LABELS, 5, seed=2).indices(300, 5, 0, 0, 2).sort().values,
                           shares[0].sort().values)
    with pytest.raises(ConfigError, match="pathological.k"):
        parse("pathological(0)")
    with pytest.raises(ConfigError, match="integer class labels"):
        Pathological(2).bind(torch.rand(10), 2, 0)


def test_powerlaw_share_sizes_follow_the_power_law_and_use_every_sample():
    from unison.partitions import PowerLaw, powerlaw_sizes

    for n, workers, alpha in [(300, 5, 1.0), (1000, 8, 1.5), (97, 4, 0.0), (20, 10, 3.0)]:
        sizes = powerlaw_sizes(n, workers, alpha)
        assert sum(sizes) == n and min(sizes) >= 1
        weights = [(r + 1) ** -alpha for r in range(workers)]
        spare = n - workers
        for size, weight in zip(sizes, weights):  # 1 each, the rest by the law, within rounding
            assert abs(size - 1 - spare * weight / sum(weights)) < 1
        part = PowerLaw(alpha)
        shares = [part.indices(n, workers, r, 0, 7) for r in range(workers)]
        assert [len(s) for s in shares] == sizes == part.sizes(n, workers)
        assert torch.equal(torch.cat(shares).sort().values, torch.arange(n))
        later = [part.indices(n, workers, r, 3, 7) for r in range(workers)]
        assert all(torch.equal(a.sort().values, b.sort().values) for a, b in zip(shares, later))
    assert powerlaw_sizes(97, 4, 0.0) == [25, 24, 24, 24]
    assert parse("powerlaw(2)").alpha == 2 and parse(PowerLaw(2).spec()) == PowerLaw(2)
    with pytest.raises(ConfigError, match="powerlaw.alpha"):
        parse("powerlaw(-1)")


@pytest.mark.parametrize("partition", ["pathological(2)", "powerlaw(1.0)"])
def test_fit_trains_on_the_new_partitions_counting_every_sample(blobs, small_model, partition):
    import unison
    from unison.partitions import parse as parse_partition

    result = unison.fit(small_model, blobs, strategy="periodic", partition=partition, workers=3,
                        backend="threads", epochs=2, batch_size=8, val=None, progress=False)
    shares = parse_partition(partition).bind(blobs[1], 3, 0).sizes(96, 3)
    assert result.history[-1]["samples"] == 2 * sum(shares)
    assert result.config.partition.spec() == parse_partition(partition).spec()
