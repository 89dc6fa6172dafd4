"""Experiment 4, diloco: an outer Nesterov step on the replicas' mean change beats plain
averaging and outer Adam; quality degrades gently as the replicas talk less often; non-IID
shares cost more early than late (Douillard et al. 2023)."""

from __future__ import annotations

import math
from typing import Callable

from ..summary import Records
from .base import Context, Experiment, Finding, differences, final, per_seed

WORKERS, BATCH, INNER_LR, WEIGHT_DECAY = 8, 16, 1e-3, 0.01
# H: 2 epochs of a 180-sample share at batch 16; the range is the one first chosen, before any result
# (a later draft's (12, 24, 48) was picked after (8, 24, 96) missed "gently" on a trial seed: not judged)
EVERY, EVERIES = 24, (8, 24, 96)
NESTEROV = "outer_lr=0.7, outer_momentum=0.9, nesterov=true"   # the paper's outer step
ADAM_LR = 0.1                          # Flower's FedAdam default eta (the paper's lr was not verified)
SKEW = "dirichlet(0.1)"
KEPT = 0.5                             # finding (c): "gently" = the largest H keeps half of 8 workers' gain
EARLY = 0.25                           # finding (d): the gap at 25% of the run


def epochs(quick: bool) -> int:
    return 24 if quick else 40


TRAIN_ROWS = 1437  # digits' training split (80% of 1,797)
SHARE_STEPS = math.ceil(math.ceil(TRAIN_ROWS / WORKERS) / BATCH)  # a worker's steps an epoch: 12
STEPS, QUICK_STEPS = epochs(False) * SHARE_STEPS, epochs(True) * SHARE_STEPS
SINGLE_STEPS = epochs(False) // WORKERS * math.ceil(TRAIN_ROWS / BATCH)  # the single worker's: 450


def nesterov(every: int) -> str:
    return f"diloco(every={every}, {NESTEROV})"


def acc_at(fraction: float, run_epochs: int) -> Callable[[Records], float]:
    """Validation accuracy of the first record at or after ``fraction`` of the run's epochs
    (records come at merges: every H steps)."""
    return lambda records: float(next(r for r in records if r["epoch"] >= fraction * run_epochs - 1e-9)["val_acc"])


def kept_gain(single: list[float], small: list[float], large: list[float]) -> list[float]:
    """Per seed, the share of the gain over one worker (single − loss at the smallest H) that
    the largest H keeps: (single − large) / (single − small); 0 where there was no gain."""
    return [(s - lg) / (s - sm) if s > sm else 0.0 for s, sm, lg in zip(single, small, large)]


def measure(context: Context) -> list[Finding]:
    run_epochs = epochs(context.quick)
    runs = {"single": {"strategy": "single", "workers": 1, "epochs": max(1, run_epochs // WORKERS)},
            "outer SGD (periodic)": {"strategy": f"periodic(every={EVERY})"},
            "outer Adam": {"strategy": f"diloco(every={EVERY}, outer=adam, outer_lr={ADAM_LR:g})"}}
    runs |= {f"Nesterov H={h}": {"strategy": nesterov(h)} for h in EVERIES}
    runs |= {f"Nesterov H={EVERY} {SKEW}": {"strategy": nesterov(EVERY), "partition": SKEW}}
    loaded = context.compare("outer", runs, workers=WORKERS, epochs=run_epochs, batch_size=BATCH,
                             optimizer="adamw", lr=INNER_LR, weight_decay=WEIGHT_DECAY)
    loss = {name: per_seed(loaded, name, final("val_loss")) for name in runs}
    main = f"Nesterov H={EVERY}"
    findings = [Finding(
        claim="an outer Nesterov step (lr 0.7, momentum 0.9) ends at a lower validation loss than plain averaging "
              "(outer SGD with lr 1 and no momentum, i.e. periodic)",
        metric="final val loss", arms={"outer SGD (periodic)": loss["outer SGD (periodic)"], main: loss[main]},
        effect="periodic − Nesterov final val loss", effects=differences(loss["outer SGD (periodic)"], loss[main]))]
    findings.append(Finding(
        claim=f"the outer Nesterov step ends lower than an outer Adam step (FedAdam, lr {ADAM_LR:g})",
        metric="final val loss", arms={"outer Adam": loss["outer Adam"], main: loss[main]},
        effect="Adam − Nesterov final val loss", effects=differences(loss["outer Adam"], loss[main])))
    by_h = [loss[f"Nesterov H={h}"] for h in EVERIES]
    findings.append(Finding(
        claim=f"the loss grows with H ({', '.join(map(str, EVERIES))} inner steps a round)",
        metric="final val loss", arms={f"Nesterov H={h}": values for h, values in zip(EVERIES, by_h)},
        effect="the smallest increase of the final loss from one H to the next",
        effects=[min(b - a for a, b in zip(seed, seed[1:])) for seed in zip(*by_h)]))
    findings.append(Finding(
        claim=f"…but gently: at H={EVERIES[-1]} DiLoCo keeps at least {KEPT:.0%} of what {WORKERS} workers at "
              f"H={EVERIES[0]} gain over one worker taking as many steps",
        metric="final val loss", arms={"single": loss["single"], f"Nesterov H={EVERIES[0]}": by_h[0],
                                       f"Nesterov H={EVERIES[-1]}": by_h[-1]},
        effect=f"(single − H={EVERIES[-1]}) / (single − H={EVERIES[0]}) − {KEPT:g}",
        effects=[k - KEPT for k in kept_gain(loss["single"], by_h[0], by_h[-1])]))
    skewed = f"Nesterov H={EVERY} {SKEW}"
    early, end = acc_at(EARLY, run_epochs), final("val_acc")
    gap_early = differences(per_seed(loaded, main, early), per_seed(loaded, skewed, early))
    gap_end = differences(per_seed(loaded, main, end), per_seed(loaded, skewed, end))
    findings.append(Finding(
        claim=f"non-IID shares ({SKEW}) cost more accuracy early in the run than at its end",
        metric="val acc gap, IID − non-IID", arms={f"at {EARLY:.0%} of the run": gap_early, "at the end": gap_end},
        effect=f"gap at {EARLY:.0%} − gap at the end", effects=differences(gap_early, gap_end), percent=True,
        effect_unit="pp"))
    return findings


EXPERIMENT = Experiment(
    name="diloco",
    paper="Douillard et al. 2023, DiLoCo: Distributed Low-Communication Training of Language Models (arXiv 2311.08105)",
    claim="Federated averaging with many inner AdamW steps and an outer Nesterov momentum step on the replicas' "
          "mean change trains as well as fully synchronous training while communicating far less, and is robust "
          "to each worker's data distribution (the abstract). Tested here, as the paper's ablations are "
          "described (not verified against its figures): the outer Nesterov step beats plain averaging and "
          "outer Adam, quality degrades gently as the rounds get longer, and non-IID shares slow training "
          "early more than at the end.",
    paper_figure="From the abstract (the ablation figures were not verified here): \"the inner optimizer is AdamW, "
                 "and the outer optimizer is Nesterov momentum. On the widely used C4 dataset, we show that DiLoCo "
                 "on 8 workers performs as well as fully synchronous optimization while communicating 500 times "
                 "less. DiLoCo exhibits great robustness to the data distribution of each worker.\"",
    setup=f"Digits (1797 8×8 images, 20% held out), an MLP with 64 hidden units, {WORKERS} workers on the stacked "
          f"backend, inner AdamW (lr {INNER_LR:g}, weight decay {WEIGHT_DECAY:g}, batch {BATCH}), {epochs(False)} "
          f"epochs ({STEPS} steps a worker). The main arm is the paper's outer step: diloco(every={EVERY}, "
          f"{NESTEROV}), {STEPS // EVERY} rounds. The paper's momentum 0.9, not unison's default 0.5: the default "
          "is for SGD-momentum inside and few rounds (README, \"Choosing diloco's outer step\"), and with AdamW "
          f"inside 0.9 trains here. Against it: plain averaging (periodic(every={EVERY}) = outer SGD lr 1, no "
          f"momentum), outer Adam (FedAdam, lr {ADAM_LR:g}, β 0.9/0.99, τ 1e-3: Flower's default lr, the better "
          f"of 0.1 and 0.01 in a trial on one seed), H ∈ {{{', '.join(map(str, EVERIES))}}} "
          f"({', '.join(str(STEPS // h) for h in EVERIES)} rounds), a single worker taking about as many steps "
          f"({epochs(False) // WORKERS} epochs of all the data: {SINGLE_STEPS} "
          f"steps, whole epochs only), and the main arm on {SKEW} shares. Final validation loss (the paper "
          "reports perplexity, i.e. loss); the non-IID gap in validation accuracy from the records at merges "
          "(the first at 25% of the epochs, and the last).",
    quick_note=f"{epochs(True)} epochs ({QUICK_STEPS} steps a worker; "
               f"{', '.join(str(QUICK_STEPS // h) for h in EVERIES)} rounds) instead of {epochs(False)}; the single "
               f"worker {epochs(True) // WORKERS} epochs. With fewer rounds outer Adam comes closer to Nesterov.",
    caveat="The paper trains transformer language models on C4 and communicates 500 times less than synchronous "
           "training (the abstract): long runs of many rounds of hundreds of inner steps. Here a 4,810-parameter "
           f"MLP takes {STEPS} steps, so the largest H leaves {STEPS // EVERIES[-1]} rounds, and an outer momentum "
           "of 0.9 "
           "has few rounds to build up. The H range was fixed before any result was seen; a narrower one "
           "((12, 24, 48)) chosen after this one missed \"gently\" on a trial seed passed it, so the \"gently\" "
           "verdict depends on how far H is pushed. Outer Adam's lr is not tuned per H as a paper would tune "
           "it. Dirichlet(0.1) on 8 workers gives some workers a few dozen samples of two or three classes, a "
           "harsher skew than a "
           "split of text documents is likely to be.",
    measure=measure,
)
