"""oneshot: independent training from one start, one merge at the end."""

from __future__ import annotations

from dataclasses import dataclass

from .. import merges
from .base import Strategy, parse_merge


@dataclass(frozen=True)
class Oneshot(Strategy):
    """Every replica trains alone for all epochs; the replicas are merged once at the end.

    With ``partition="shard"`` each sees its own part of the data; with ``partition="full"``
    each sees all of it in its own order (the "same data" variant). Averaging works when the
    replicas stay in one basin of the loss, which a shared start encourages (Zinkevich et al.
    2010, "Parallelized Stochastic Gradient Descent"); ``merge="greedy_soup"`` keeps only the
    replicas that help on validation data (Wortsman et al. 2022, "Model soups").
    """

    name = "oneshot"
    merge: merges.Merge = merges.Mean()

    def __post_init__(self) -> None:
        parse_merge(self)

    def round_ends(self, step, epoch_end):
        return False  # the loop ends one last round when training ends
