"""A learning-rate sweep and its model soup in one run: 8 replicas of an MLP, each with its own
learning rate, trained side by side as one batched computation (backend="stacked"), then
merged by a greedy soup on validation data (Wortsman et al. 2022, "Model soups"). The largest
rates diverge (a huge train_loss); the soup leaves those replicas out, a uniform mean cannot.

    .venv/bin/python examples/stacked_soup.py
"""

import torch

import unison
from unison.models import mlp

LEARNING_RATES = [0.003, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5]


def one_lr_per_replica(groups):
    """On backend="stacked" the optimizer factory receives one parameter group per replica."""
    return torch.optim.SGD([dict(group, lr=lr) for group, lr in zip(groups, LEARNING_RATES)],
                           lr=0.1, momentum=0.9)


if __name__ == "__main__":
    model = lambda: mlp(64, [64], 10)  # noqa: E731 - digits: 64 pixels, 10 classes
    common = dict(val=0.2, workers=len(LEARNING_RATES), backend="stacked", partition="full", epochs=10,
                  batch_size=32, optimizer=one_lr_per_replica, progress=False)
    soup = unison.fit(model, "digits", strategy="oneshot(merge=greedy_soup)", **common)
    mean = unison.fit(model, "digits", strategy="oneshot", **common)
    print(soup.summary())
    print(f"greedy soup: {soup.final['val_acc']:.2%}   uniform mean of all 8: {mean.final['val_acc']:.2%}")
