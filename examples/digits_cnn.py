"""A small convolutional network for `unison train examples/digits_cnn.toml`: the run file names
it as class_path = "digits_cnn.py:DigitsCNN" and gives its arguments under [model.init_args].

The built-in digits data set arrives as 64 standardised features a sample; the model views them
as a 1x8x8 image.
"""

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """A 3x3 convolution, a 2x2 pool and a linear read-out."""

    def __init__(self, channels: int = 8, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, kernel_size=3, padding=1)
        self.head = nn.Linear(channels * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x.view(-1, 1, 8, 8)))
        return self.head(nn.functional.max_pool2d(x, 2).flatten(1))
