import pytest
import torch

from unison.models import mlp

from toy_models import blobs_data


@pytest.fixture(scope="session")
def blobs():
    """96 samples, 8 features, 3 classes that a small MLP can separate."""
    return blobs_data()


@pytest.fixture
def small_model():
    torch.manual_seed(0)
    return mlp(8, [16], 3)
