import pytest
import torch

from unison.models import mlp


@pytest.fixture(scope="session")
def blobs():
    """96 samples, 8 features, 3 classes that a small MLP can separate."""
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(3, 8, generator=g) * 2
    y = torch.arange(96) % 3
    x = centres[y] + torch.randn(96, 8, generator=g)
    return x, y


@pytest.fixture
def small_model():
    torch.manual_seed(0)
    return mlp(8, [16], 3)
