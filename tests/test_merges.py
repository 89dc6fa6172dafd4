"""Merge math on hand-computed cases, and the rules' validation."""

import pytest
import torch

from unison import merges
from unison.errors import ConfigError

from reference import median_reference, multi_krum_reference, trimmed_mean_reference

# Five 2-d states; the third is an outlier.
STATES = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0]), torch.tensor([100.0, 100.0]),
          torch.tensor([2.0, 1.0]), torch.tensor([2.0, 2.0])]


def test_median_is_coordinate_wise_and_averages_the_two_middles_for_even_counts():
    assert torch.equal(merges.median(STATES), torch.tensor([2.0, 2.0]))
    assert torch.equal(merges.median(STATES[:4]), torch.tensor([2.5, 1.5]))  # (2+3)/2, (1+2)/2


def test_trimmed_mean_drops_floor_beta_n_from_each_end():
    # beta=0.2, n=5: drop one from each end per coordinate: x {1,2,2,3,100} -> 7/3; y {0,1,2,2,100} -> 5/3
    assert torch.allclose(merges.trimmed_mean(STATES, 0.2), torch.tensor([7 / 3, 5 / 3]))
    assert torch.allclose(merges.trimmed_mean(STATES, 0.0), merges.mean(STATES))
    with pytest.raises(ValueError, match="beta"):
        merges.trimmed_mean(STATES, 0.5)


def test_krum_scores_by_hand():
    # n=5, f=1: each state's score sums its n-f-2 = 2 smallest squared distances.
    # state 0 (1,2): to (3,0) 8, to (2,1) 2, to (2,2) 1 -> 1+2 = 3
    scores = merges.krum_scores(STATES, f=1)
    assert scores[0].item() == pytest.approx(3.0)
    assert scores[4].item() == pytest.approx(2.0)   # (2,2): (1,2) 1, (2,1) 1
    assert torch.equal(merges.krum(STATES, f=1), torch.tensor([2.0, 2.0]))
    # multi-krum m=3 averages the three best: (2,2) 2, (2,1) 2, (1,2) 3
    assert torch.allclose(merges.multi_krum(STATES, f=1, m=3), torch.tensor([5 / 3, 5 / 3]))
    # default m = n - f = 4: all but the outlier (scores 3, 7, huge, 3, 2)
    assert torch.allclose(merges.multi_krum(STATES, f=1), torch.tensor([2.0, 1.25]))
    with pytest.raises(ValueError, match="2f\\+3"):
        merges.krum(STATES, f=2)


def test_greedy_soup_keeps_an_ingredient_only_if_the_score_does_not_drop():
    states = [torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([-1.0])]
    # score: closer to 1.2 is better. Sorted by score: 1, 0 or 3? |1-1.2|=.2, |0-1.2|=1.2, |3-1.2|=1.8, |-1-1.2|=2.2
    score = lambda s: -abs(float(s[0]) - 1.2)  # noqa: E731
    soup, chosen = merges.greedy_soup(states, score)
    # soup {1}: .2; +0 -> mean .5: .7 worse, rejected; +3 -> mean 2: .8 worse, rejected; +(-1) -> 0: worse
    assert chosen == [1] and torch.equal(soup, torch.tensor([1.0]))
    score2 = lambda s: -abs(float(s[0]) - 1.6)  # noqa: E731
    soup, chosen = merges.greedy_soup(states, score2)
    # order: 1 (.6), 3 (1.4), 0 (1.6), -1 (2.6); {1,3}: mean 2 -> .4 better, kept; {1,3,0}: 4/3 -> .27 better, kept;
    # {1,3,0,-1}: 3/4 -> .85 worse, rejected
    assert chosen == [1, 2, 0] and torch.allclose(soup, torch.tensor([4 / 3]))


@pytest.mark.parametrize("n", [3, 4, 7])
def test_rules_equal_plain_references_on_random_states(n):
    g = torch.Generator().manual_seed(n)
    states = [torch.randn(50, generator=g) for _ in range(n)]
    assert torch.allclose(merges.median(states), median_reference(states), atol=1e-6)
    assert torch.allclose(merges.trimmed_mean(states, 0.34), trimmed_mean_reference(states, 0.34), atol=1e-6)
    if n >= 5:
        assert torch.allclose(merges.multi_krum(states, 1, 3), multi_krum_reference(states, 1, 3), atol=1e-6)


def test_weighted_mean_and_divergence():
    merged = merges.weighted_mean(STATES[:2], [1.0, 3.0])
    assert torch.allclose(merged, torch.tensor([2.5, 0.5]))
    # distances: |(1,2)-(2.5,.5)| = sqrt(4.5), |(3,0)-(2.5,.5)| = sqrt(.5)
    assert merges.divergence(STATES[:2], merged) == pytest.approx((4.5 ** 0.5 + 0.5 ** 0.5) / 2)


@pytest.mark.parametrize("spec, expected", [
    ("mean", merges.Mean()), ("median", merges.Median()), ("trimmed_mean(0.1)", merges.TrimmedMean(0.1)),
    ("krum(f=2)", merges.Krum(2)), ("multi_krum(1, 3)", merges.MultiKrum(f=1, m=3)),
    ("greedy_soup", merges.GreedySoup()),
])
def test_rules_parse_from_specs_and_back(spec, expected):
    rule = merges.parse(spec)
    assert rule == expected
    assert merges.parse(rule.spec()) == rule


@pytest.mark.parametrize("spec, words", [
    ("trimmed_mean(0.5)", ["trimmed_mean.beta=0.5", "[0, 0.5)"]),
    ("trimmed_mean(-0.1)", ["trimmed_mean.beta=-0.1"]),
    ("krum(f=-1)", ["krum.f=-1", ">= 0"]),
    ("multi_krum(m=0)", ["multi_krum.m=0"]),
    ("average", ["merge='average'", "'median'", "'krum'"]),
    ("krum(g=1)", ["no option 'g'", "accepted: f"]),
])
def test_bad_rule_options_name_the_field_and_the_accepted_values(spec, words):
    with pytest.raises(ConfigError) as info:
        merges.parse(spec)
    for word in words:
        assert word in str(info.value)


def test_rules_check_the_number_of_workers():
    with pytest.raises(ConfigError, match="workers >= 2f\\+3 = 5"):
        merges.Krum(f=1).check(4)
    merges.Krum(f=1).check(5)
    with pytest.raises(ConfigError, match="trims nothing with 4 workers"):
        merges.TrimmedMean(0.2).check(4)
    with pytest.raises(ConfigError, match="multi_krum.m=6"):
        merges.MultiKrum(f=1, m=6).check(5)
