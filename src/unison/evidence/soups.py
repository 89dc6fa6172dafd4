"""Experiment 5, soups: from one pre-trained start, a greedy soup of a fine-tuning sweep beats the
best single model and the uniform soup; from different random starts, a uniform soup collapses
(Wortsman et al. 2022, "Model soups").

From one pre-trained start, each ingredient is a `single` run with its own learning rate and
weight decay: unison's multi-replica strategies give every replica the same settings, so the
sweep is a comparison of runs (one per seed, since each seed pre-trains its own start), and the
ingredients are the models it saved. From different random starts, each ingredient is a
`unison.fit` of its own: one comparison starts every run from the same weights. The soups are made with unison.merges'
``mean`` and ``greedy_soup``, the functions behind ``oneshot`` and ``oneshot(merge=greedy_soup)``.
The greedy soup picks its ingredients on a selection split and every model is scored on a
separate test split (scoring it on the split it was picked on would favour it by construction).
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from safetensors.torch import load_file

from .. import merges, models
from ..api import fit
from ..data import prepare
from ..plan import MODEL_FILE
from .base import Context, Experiment, Finding, differences

SWEEP = tuple((lr, decay) for lr in (0.01, 0.03, 0.1, 0.3) for decay in (0.0, 1e-3))  # (lr, weight decay)
PRETRAIN_EPOCHS = 2
BATCH = 64
HELD_OUT = 0.4          # of digits: half selects the greedy soup's ingredients, half tests
COLLAPSE_POINTS = 0.10  # finding (c): the uniform soup of different starts falls this far below


@dataclass
class Splits:
    train: tuple[torch.Tensor, torch.Tensor]
    select: tuple[torch.Tensor, torch.Tensor]   # picks the best single model and the greedy soup
    test: tuple[torch.Tensor, torch.Tensor]     # scores every model


def splits(seed: int) -> Splits:
    """Digits (standardised on the training split) with HELD_OUT held out, halved at random."""
    data = prepare("digits", val=HELD_OUT, seed=seed)
    order = torch.randperm(len(data.x_val), generator=torch.Generator().manual_seed(seed))
    half = len(order) // 2
    pick, test = order[:half], order[half:]
    return Splits((data.x, data.y), (data.x_val[pick], data.y_val[pick]), (data.x_val[test], data.y_val[test]))


def network() -> nn.Module:
    return models.mlp(64, [64], 10)


def accuracy(template: nn.Module, state: torch.Tensor, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Accuracy of ``template``'s architecture with the flat parameters ``state``."""
    model = copy.deepcopy(template)
    vector_to_parameters(state, model.parameters())
    with torch.no_grad():
        return float((model(data[0]).argmax(dim=1) == data[1]).float().mean())


def train(start: Callable[[], nn.Module], data: Splits, lr: float, decay: float, epochs: int,
          seed: int) -> torch.Tensor:
    """One ingredient from a random start: ``start`` (a factory, seeded with ``seed``) trained
    alone with SGD; its flat parameters."""
    result = fit(start, data.train, data.select, strategy="single", backend="stacked", workers=1, epochs=epochs,
                 batch_size=BATCH, lr=lr, momentum=0.9, weight_decay=decay, seed=seed, progress=False)
    return parameters_to_vector(result.model.parameters()).detach()


@dataclass
class Soups:
    """Test accuracies of one sweep's ingredients and soups."""

    ingredients: list[float]
    best_single: float   # the ingredient best on the selection split
    uniform: float
    greedy: float
    greedy_size: int


def soups(template: nn.Module, states: list[torch.Tensor], data: Splits) -> Soups:
    """The uniform and greedy soups of ``states`` (greedy picked on data.select), all scored on
    data.test."""
    select = [accuracy(template, s, data.select) for s in states]
    best = max(range(len(states)), key=lambda i: select[i])  # ties: the first, as greedy_soup's sort
    greedy, chosen = merges.greedy_soup(states, lambda s: accuracy(template, s, data.select))
    return Soups(ingredients=[accuracy(template, s, data.test) for s in states],
                 best_single=accuracy(template, states[best], data.test),
                 uniform=accuracy(template, merges.mean(states), data.test),
                 greedy=accuracy(template, greedy, data.test), greedy_size=len(chosen))


def sweep_label(lr: float, decay: float) -> str:
    return f"lr={lr:g} wd={decay:g}"


def fine_tuned(context: Context, pretrained: nn.Module, data: Splits, epochs: int, seed: int) -> list[torch.Tensor]:
    """The sweep fine-tuned from ``pretrained`` as one comparison (its report beside the
    results, validated on the selection split); the ingredients' flat parameters, in SWEEP order."""
    runs = {sweep_label(lr, decay): {"strategy": "single", "lr": lr, "weight_decay": decay} for lr, decay in SWEEP}
    part = f"sweep-seed{seed}"
    loaded = context.compare(part, runs, seeds=[seed], model=pretrained, data=data.train, val=data.select,
                             epochs=epochs, batch_size=BATCH, momentum=0.9)
    states = []
    for label in runs:
        model = copy.deepcopy(pretrained)
        model.load_state_dict(load_file(context.out / part / loaded.compare["runs"][label]["dir"] / MODEL_FILE))
        states.append(parameters_to_vector(model.parameters()).detach())
    return states


def one_seed(context: Context, seed: int, epochs: int) -> tuple[Soups, Soups]:
    """The sweep fine-tuned from one pre-trained start, and the same sweep from different
    random starts (each trained PRETRAIN_EPOCHS + ``epochs``)."""
    data = splits(seed)
    torch.manual_seed(seed)
    pretrained = fit(network, data.train, data.select, strategy="single", backend="stacked", workers=1,
                     epochs=PRETRAIN_EPOCHS, batch_size=BATCH, lr=0.05, momentum=0.9, seed=seed, progress=False).model
    base = 1000 * seed
    shared = fine_tuned(context, pretrained, data, epochs, seed)
    apart = [train(network, data, lr, decay, PRETRAIN_EPOCHS + epochs, base + 100 + k)
             for k, (lr, decay) in enumerate(SWEEP)]
    return soups(pretrained, shared, data), soups(pretrained, apart, data)


def measure(context: Context) -> list[Finding]:
    epochs = 3 if context.quick else 6
    results = [one_seed(context, seed, epochs) for seed in context.seeds]
    shared, apart = [r[0] for r in results], [r[1] for r in results]
    best, greedy = [s.best_single for s in shared], [s.greedy for s in shared]
    uniform = [s.uniform for s in shared]
    mean_apart = [statistics.fmean(s.ingredients) for s in apart]
    uniform_apart = [s.uniform for s in apart]
    return [
        Finding(claim="from one pre-trained start, the greedy soup beats the best single model of the sweep "
                      "(picked on the selection split; both scored on the test split)",
                metric="test acc", arms={"best single": best, "greedy soup": greedy},
                effect="greedy soup − best single, test accuracy", effects=differences(greedy, best),
                percent=True, effect_unit="pp"),
        Finding(claim="from one pre-trained start, the greedy soup beats the uniform soup of the whole sweep",
                metric="test acc", arms={"uniform soup": uniform, "greedy soup": greedy},
                effect="greedy soup − uniform soup, test accuracy", effects=differences(greedy, uniform),
                percent=True, effect_unit="pp"),
        Finding(claim=f"from different random starts, the uniform soup falls more than "
                      f"{COLLAPSE_POINTS * 100:g} points "
                      "below its ingredients' mean accuracy",
                metric="test acc", arms={"ingredients' mean (different starts)": mean_apart,
                                         "uniform soup (different starts)": uniform_apart,
                                         "uniform soup (one start)": uniform},
                effect="ingredients' mean − uniform soup, test accuracy, different starts",
                effects=differences(mean_apart, uniform_apart), threshold=COLLAPSE_POINTS, percent=True,
                effect_unit="pp"),
    ]


EXPERIMENT = Experiment(
    name="soups",
    paper="Wortsman et al. 2022, Model soups: averaging weights of multiple fine-tuned models improves accuracy "
          "without increasing inference time (ICML)",
    claim="Models fine-tuned from one pre-trained start with different hyperparameters lie in one low-error "
          "basin: averaging their weights (a soup) beats the best single model of the sweep, and the greedy "
          "soup (add a model only if held-out accuracy does not drop) beats the uniform average. Models "
          "trained from different random starts do not share a basin, and their average fails.",
    paper_figure="The abstract: soups of fine-tuned CLIP, ALIGN and ViT-G models give significant improvements "
                 "over the best model in a hyperparameter sweep on ImageNet; for ViT-G the greedy soup reaches "
                 "90.94% top-1 against 90.78% for the best model of its hyperparameter search (the table on the "
                 "paper's first page).",
    setup=f"Digits (1797 8×8 images): {1 - HELD_OUT:.0%} to train, the rest halved at random into a selection "
          "split and a test split. An MLP with 64 hidden units pre-trained alone for "
          f"{PRETRAIN_EPOCHS} epochs (SGD lr 0.05, momentum 0.9, batch {BATCH}), then a sweep of {len(SWEEP)} "
          "fine-tuning runs from that start, lr in {0.01, 0.03, 0.1, 0.3} × weight decay in {0, 0.001}, "
          "6 epochs each, as one comparison per seed (strategy single, stacked backend; the seed's data "
          "order is every run's, so the runs differ in lr and weight decay only). "
          "The best single model and the greedy soup are picked on the selection split; every accuracy is "
          "on the test split. For (c) the same sweep trains from scratch, each run from its own random "
          f"initialisation, for {PRETRAIN_EPOCHS} + 6 epochs; its uniform soup is compared with its "
          "ingredients. Soups are unison.merges.mean and unison.merges.greedy_soup, what oneshot's merges use; "
          "the ingredients are runs of their own because oneshot's replicas share one learning rate and one "
          "start (the different-start runs are unison.fit calls, with no comparison report).",
    quick_note="3 fine-tuning epochs instead of 6.",
    caveat="The 'pre-trained start' is two epochs on the same digits, not a large model pre-trained on other "
           "data, so fine-tuning moves less and the sweep's models are closer together than CLIP's; gains "
           "of soups over the best single model are small at this scale and the test split (about 360 "
           "images) resolves steps of about 0.3%. The sweep is 8 runs, not the paper's 72.",
    measure=measure,
)
