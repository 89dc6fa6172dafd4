"""Small reference models. Any nn.Module works with unison; these are the ones it ships."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .validators import check_choice, check_float, check_int

_ACTIVATION_LAYERS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
}
ACTIVATIONS = tuple(_ACTIVATION_LAYERS)


def mlp(inputs: int, hidden: Sequence[int], outputs: int, activation: str = "relu",
        dropout: float = 0.0, batchnorm: bool = False) -> nn.Sequential:
    """A feed-forward network: [Linear → (BatchNorm1d) → activation → (Dropout)] per hidden
    layer, then a Linear to ``outputs`` (logits for classification, values for regression)."""
    check_int("inputs", inputs, minimum=1)
    check_int("outputs", outputs, minimum=1)
    for width in hidden:
        check_int("hidden", width, minimum=1)
    check_choice("activation", activation, ACTIVATIONS)
    check_float("dropout", dropout, low=0.0, high=1.0)
    layers: list[nn.Module] = []
    width_in = inputs
    for width in hidden:
        layers.append(nn.Linear(width_in, width))
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(_ACTIVATION_LAYERS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width_in = width
    layers.append(nn.Linear(width_in, outputs))
    return nn.Sequential(*layers)
