"""Experiment 1, fedavg: more local work per round (local epochs E, batch B) cuts the rounds
to a target accuracy against FedSGD on IID shares, and by much less on pathological non-IID
shares (McMahan et al. 2017, Communication-Efficient Learning of Deep Networks from
Decentralized Data, Table 2)."""

from __future__ import annotations

import math
from typing import Callable

from ..summary import Records
from .base import Context, Experiment, Finding, first_reaching, median, per_seed

WORKERS = 10
TRAIN_SAMPLES = 1437                      # digits less the 20% held out
SHARE = TRAIN_SAMPLES // WORKERS          # 143 on shard, 142 on pathological(2): one batch of 143 either way
TARGET = 0.95
PARTITIONS = {"IID": "shard", "non-IID": "pathological(2)"}
LOCAL_WORK = ((1, 50), (1, 10), (5, 50), (5, 10))   # (E, B): McMahan et al.'s grid, cut to what digits affords
LRS = (0.3, 1.0)                          # each arm's lr is the grid's best for it, as the paper optimised η
BUDGET = (10, 40)                         # rounds: (each FedAvg arm, FedSGD)
FEDSGD = "FedSGD"


def steps_per_round(epochs: int, batch: int) -> int:
    """Optimizer steps between two merges of FedAvg with E=``epochs`` on a share of SHARE samples."""
    return epochs * math.ceil(SHARE / batch)


def fedavg_label(epochs: int, batch: int) -> str:
    return f"FedAvg E={epochs} B={batch}"


def arms(rounds: int, fedsgd_rounds: int, local_work=LOCAL_WORK) -> dict[str, tuple[dict, int]]:
    """The runs of one partition and lr, label → (run options, steps per round); every FedAvg
    arm, one per (E, B) of ``local_work``, trains ``rounds`` rounds, FedSGD (one full-share step
    per round) ``fedsgd_rounds``."""
    runs = {FEDSGD: ({"strategy": "sync", "batch_size": TRAIN_SAMPLES, "epochs": fedsgd_rounds}, 1)}
    for epochs, batch in local_work:
        every = steps_per_round(epochs, batch)
        runs[fedavg_label(epochs, batch)] = (
            {"strategy": f"periodic(every={every})", "batch_size": batch, "epochs": rounds * epochs}, every)
    return runs


def rounds_to(target: float, per_round: int) -> Callable[[Records], float]:
    """Rounds (merges) until the merged model first reached ``target``: the record's step over
    the steps per round (sync all-reduces every step, so each of its steps is a round); nan if
    never reached."""
    first = first_reaching(target, "val_acc", at="step")
    return lambda records: first(records) / per_round


def fewest(rounds: list[float]) -> tuple[int, float, float]:
    """A sort key for fewest rounds over the seeds: more seeds reaching first, then the lower
    median of those that did, then the lower mean (so a tie in medians goes by the mean)."""
    reached = [r for r in rounds if not math.isnan(r)]
    return (-len(reached), median(reached), sum(reached) / len(reached)) if reached else (0, math.inf, math.inf)


def best_lr(by_lr: dict[float, list[float]]) -> float:
    """The lr whose rounds over the seeds are fewest (``fewest``); full ties go to the smaller lr."""
    return min(by_lr, key=lambda lr: (fewest(by_lr[lr]), lr))


def fastest(arms_rounds: dict[str, list[float]]) -> str:
    """The FedAvg arm (never FedSGD) whose rounds over the seeds are fewest (``fewest``): shown,
    not judged (picking it on the judged seeds would favour the claim)."""
    return min((label for label in arms_rounds if label != FEDSGD), key=lambda label: fewest(arms_rounds[label]))


JUDGED = fedavg_label(5, 10)  # the paper's headline setting, fixed before any result: the arm judged


def speedups(fedsgd: list[float], fedavg: list[float], fedsgd_budget: int, censor_fedsgd: bool) -> list[float]:
    """Per seed FedSGD rounds / FedAvg rounds. A FedAvg miss gives nan. A FedSGD miss gives
    ``fedsgd_budget`` / FedAvg rounds (a lower bound) when ``censor_fedsgd``, else nan."""
    out = []
    for sgd, avg in zip(fedsgd, fedavg):
        if math.isnan(avg) or (math.isnan(sgd) and not censor_fedsgd):
            out.append(math.nan)
        else:
            out.append((fedsgd_budget if math.isnan(sgd) else sgd) / avg)
    return out


def gain_drop(iid: list[float], skewed_fedsgd: list[float], skewed_fedavg: list[float], rounds: int) -> list[float]:
    """Per seed log(IID speedup) − log(non-IID speedup). A non-IID FedAvg miss counts as
    ``rounds`` (its speedup is then at most FedSGD / budget, so the effect is a lower bound);
    a non-IID FedSGD miss or a nan IID speedup gives nan."""
    out = []
    for speedup, sgd, avg in zip(iid, skewed_fedsgd, skewed_fedavg):
        if math.isnan(speedup) or math.isnan(sgd):
            out.append(math.nan)
        else:
            out.append(math.log(speedup) - math.log(sgd / (rounds if math.isnan(avg) else avg)))
    return out


def measure(context: Context) -> list[Finding]:
    rounds, fedsgd_rounds = BUDGET
    runs = arms(rounds, fedsgd_rounds)
    chosen: dict[str, dict[str, list[float]]] = {}   # partition → arm → rounds per seed at its best lr
    picked: dict[str, dict[str, float]] = {}
    for name, partition in PARTITIONS.items():
        tried = {f"{label} lr={lr:g}": options | {"lr": lr} for lr in LRS for label, (options, _) in runs.items()}
        loaded = context.compare(name, tried, workers=WORKERS, partition=partition, momentum=0.0)
        chosen[name], picked[name] = {}, {}
        for label, (_, per_round) in runs.items():
            by_lr = {lr: per_seed(loaded, f"{label} lr={lr:g}", rounds_to(TARGET, per_round)) or
                     [math.nan] * len(context.seeds) for lr in LRS}  # a run that diverged has no records
            picked[name][label] = best_lr(by_lr)
            chosen[name][label] = by_lr[picked[name][label]]
    iid, skewed = chosen["IID"], chosen["non-IID"]
    iid_speedup = speedups(iid[FEDSGD], iid[JUDGED], fedsgd_rounds, censor_fedsgd=True)

    def shown(name: str, label: str) -> str:
        return f"{label} {name} (lr {picked[name][label]:g})"

    return [
        Finding(claim=f"on IID shares, local work ({JUDGED}) cuts the rounds to {TARGET:.0%} val acc against "
                      f"FedSGD (FedSGD rounds / FedAvg rounds > 1; fastest arm here: {fastest(iid)})",
                metric=f"rounds to {TARGET:.0%} val acc",
                arms={shown("IID", label): iid[label] for label in runs},
                effect=f"FedSGD rounds / {JUDGED} rounds (IID)", effects=iid_speedup, threshold=1.0),
        Finding(claim="the cut is smaller on pathological non-IID shares (2 classes per worker)",
                metric=f"rounds to {TARGET:.0%} val acc",
                arms={shown("IID", FEDSGD): iid[FEDSGD], shown("IID", JUDGED): iid[JUDGED],
                      shown("non-IID", FEDSGD): skewed[FEDSGD], shown("non-IID", JUDGED): skewed[JUDGED]},
                effect=f"log(IID speedup) − log(non-IID speedup), each FedSGD / {JUDGED}",
                effects=gain_drop(iid_speedup, skewed[FEDSGD], skewed[JUDGED], rounds)),
    ]


EXPERIMENT = Experiment(
    name="fedavg",
    paper="McMahan et al. 2017, Communication-Efficient Learning of Deep Networks from Decentralized Data",
    claim="Federated averaging (FedAvg): more local SGD per round, through more local epochs E or smaller "
          "batches B, cuts the communication rounds needed to reach a target accuracy by an order of "
          "magnitude against FedSGD (one full-batch gradient step per round) on IID shares; on "
          "pathological non-IID shares (two digit classes per client) the cut is smaller.",
    paper_figure="Abstract: a reduction in required communication rounds by 10–100× as compared to "
                 "synchronized SGD. Table 2 (MNIST CNN, rounds to 99% test accuracy, C = 0.1): FedSGD 626 "
                 "rounds IID and 483 non-IID; FedAvg E=5 B=10 20 rounds (31.3×) IID and 229 (2.1×) non-IID; "
                 "E=20 B=10 18 (34.8×) and 173 (2.8×). The text: 35× (CNN) and 46× (2NN) on IID, "
                 "“smaller, but still substantial (2.8–3.7×)” on the pathological non-IID split.",
    setup=f"Digits (1797 8×8 images, 20% held out), an MLP with 64 hidden units, {WORKERS} workers on the "
          f"stacked backend, every worker in every round (C = 1), plain SGD (no momentum, as the paper). "
          f"FedSGD: sync with a batch larger than a share, so each round is one step on the whole share. "
          f"FedAvg: periodic, merging every E·⌈{SHARE}/B⌉ steps for (E, B) in "
          f"{', '.join(f'({e}, {b})' for e, b in LOCAL_WORK)}. Shares: shard (IID) and pathological(2) "
          f"(McMahan et al.'s split: label-sorted shards, two per worker). Each arm's lr is the best of the "
          f"grid {', '.join(f'{lr:g}' for lr in LRS)} by median rounds over the seeds, then mean (the "
          f"paper optimised η per setting). Rounds = merges until the merged model first reaches "
          f"{TARGET:.0%} validation accuracy (the record's step over the steps per round). Both findings "
          f"judge {JUDGED}, the paper's headline setting, fixed in advance (the fastest arm, picked on the "
          f"judged seeds, is only named): the IID one compares FedSGD with it; the non-IID one, the log of "
          f"that speedup with the log of the same speedup on pathological shares. "
          f"Budget: {BUDGET[0]} FedAvg rounds, {BUDGET[1]} FedSGD rounds. A FedSGD miss counts as its "
          f"budget (the IID speedup is then a lower bound); a non-IID FedAvg miss counts as the FedAvg "
          f"budget (the drop is then a lower bound); other misses leave the seed not holding.",
    quick_note="3 seeds instead of 5; nothing else changes.",
    caveat=f"Digits is small and easy: FedAvg's best arms reach the target in one to three rounds on IID, so "
           f"the IID speedup is capped by FedSGD's own rounds (tens, not the paper's hundreds) and comes in "
           f"whole rounds. The lr grid is coarse: two values (in trial runs 0.1 needed more rounds than 0.3 for "
           f"every arm, and the time budget allows no third). The target ({TARGET:.0%}) was chosen so that "
           f"every arm reaches it on IID at its best lr within the budget; at 90% the fastest arms sit at one "
           f"round, which leaves no room to see them differ. Every worker takes part in every round (the paper "
           f"sampled C = 0.1 of 100 clients), and 10 workers × 2 classes cover the ten digits about twice, so "
           f"the non-IID average is less starved than the paper's.",
    measure=measure,
)
