"""blame(): which worker a launcher names, and when, from the failures it has seen so far."""

from __future__ import annotations

import math

import pytest

from unison.comm.base import PeerFailed
from unison.errors import WorkerError
from unison.launch.processes import _patience
from unison.launch.worker import NAMED_GRACE_S, SYMPTOM_GRACE_S, Failure, blame


class Missing(PeerFailed):
    """A peer's timeout that names the ranks that did not arrive (as the roll call does)."""

    def __init__(self, *missing: int):
        super().__init__("timed out: ranks did not arrive", rank=0)
        self.missing = missing


def timeout_naming(rank: int) -> Failure:
    return Failure(0, "Traceback ... timed out", Missing(rank), symptom=True)


def closed() -> Failure:
    return Failure(0, "Traceback ... connection closed", PeerFailed("connection closed", rank=0), symptom=True)


def test_a_timeout_naming_the_missing_rank_waits_only_the_short_grace():
    failures = [timeout_naming(1)]
    assert blame(failures, silent=[1], waited_s=NAMED_GRACE_S * 0.8) is None  # its own report may lag
    error = blame(failures, silent=[1], waited_s=NAMED_GRACE_S)
    assert isinstance(error, WorkerError) and error.rank == 1 and error.lost


def test_a_cause_from_the_missing_rank_wins_over_the_timeout_that_names_it():
    cause = Failure(1, "Traceback ... ValueError: boom", ValueError("boom"))
    error = blame([timeout_naming(1), cause], silent=[], waited_s=NAMED_GRACE_S)
    assert error.rank == 1 and "boom" in str(error) and not error.lost


def test_symptoms_naming_nobody_wait_the_long_grace_then_blame_the_silent_worker():
    failures = [closed()]
    for waited in (0.0, NAMED_GRACE_S, SYMPTOM_GRACE_S * 0.95):
        assert blame(failures, silent=[2], waited_s=waited) is None
    error = blame(failures, silent=[2], waited_s=SYMPTOM_GRACE_S)
    assert error.rank == 2 and "reported nothing" in str(error) and error.lost
    assert blame(failures, silent=[], waited_s=math.inf).rank == 0  # nobody silent: the symptom itself


@pytest.mark.parametrize("waited, patience", [(0.0, NAMED_GRACE_S), (NAMED_GRACE_S, SYMPTOM_GRACE_S - NAMED_GRACE_S),
                                              (1.0, SYMPTOM_GRACE_S - 1.0), (SYMPTOM_GRACE_S, 0.0), (9.0, 0.0)])
def test_the_launcher_wakes_when_the_next_grace_ends(waited, patience):
    assert _patience(waited) == pytest.approx(patience)
