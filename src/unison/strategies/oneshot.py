"""oneshot: independent training from one start, one merge at the end."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Strategy


@dataclass(frozen=True)
class Oneshot(Strategy):
    """Every replica trains alone for all epochs; the replicas are averaged once at the end.

    With ``partition="shard"`` each sees its own part of the data; with ``partition="full"``
    each sees all of it in its own order (the "same data" variant). Averaging works when the
    replicas stay in one basin of the loss, which a shared start encourages (Wortsman et al.
    2022, "Model soups"; Zinkevich et al. 2010, "Parallelized Stochastic Gradient Descent").
    """

    name = "oneshot"

    def round_ends(self, step, epoch_end):
        return False  # the loop ends one last round when training ends
