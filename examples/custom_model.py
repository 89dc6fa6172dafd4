"""Your own nn.Module and your own arrays through unison.compare.

A small convolutional network on the 8x8 digit images (loaded as plain NumPy arrays, as your
own data would be), compared across strategies. The model class lives at module level and
the run sits under `if __name__ == "__main__":`, so that worker processes can import it.

    python examples/custom_model.py
    python examples/custom_model.py --backend threads --strategies single,sync
"""

import argparse

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import unison


class SmallConvNet(nn.Module):
    """Two 3x3 convolutions and a linear read-out, for 1x8x8 images."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 8 x 4 x 4
            nn.Conv2d(8, 16, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16 x 2 x 2
        )
        self.head = nn.Linear(16 * 2 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def load_images() -> tuple[np.ndarray, np.ndarray]:
    """Digits as (N, 1, 8, 8) float images in [0, 1] and integer labels."""
    digits = load_digits()
    return (digits.images[:, None, :, :] / 16.0).astype(np.float32), digits.target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default="single,sync,periodic(every=8),oneshot")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backend", default="processes", choices=["threads", "processes"])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", help="output directory (default runs/<date-time>-compare)")
    args = parser.parse_args()

    images, labels = load_images()
    comparison = unison.compare(
        SmallConvNet,                 # a factory: built once under the seed, copied to every replica
        (images, labels), val=0.2,    # your arrays; 20% held out for validation, stratified
        strategies=args.strategies, workers=args.workers, backend=args.backend, epochs=args.epochs,
        batch_size=32, optimizer="adam", lr=3e-3, out=args.out)
    print(comparison.table())
    winner = comparison.winner or "no clear winner (see the verdict)"
    print(f"winner: {winner}; report: {comparison.out / 'report.html'}")


if __name__ == "__main__":  # required: the processes backend re-imports this file in each worker
    main()
