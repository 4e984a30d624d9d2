"""Shared fixtures: a small real model trained on the embedded digits (seconds), the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from robustlab.data import load_dataset
from robustlab.models import create_model
from robustlab.training import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ROBUSTLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder with the real data sets (../shared/data); tests that need it skip without it."""
    if not (SHARED_DATA / "mnist_test.npz").is_file():
        pytest.skip(f"real data sets not found in {SHARED_DATA} (set ROBUSTLAB_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def digits_train():
    return load_dataset("digits", "train")


@pytest.fixture(scope="session")
def digits_test():
    return load_dataset("digits", "test")


@pytest.fixture(scope="module")
def digits(digits_model, digits_test):
    """(model, the first 150 digits test images, their labels); a test module may define its own."""
    return digits_model, digits_test.x[:150].contiguous(), digits_test.y[:150].contiguous()


@pytest.fixture(scope="session")
def digits_model(digits_train):
    """digits_cnn trained for a few seconds (about 97% clean test accuracy), in eval mode."""
    torch.manual_seed(0)
    model = create_model("digits_cnn", num_classes=10)
    train(model, digits_train, TrainConfig(epochs=8, batch_size=64, lr=0.05, seed=0), progress=False)
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests run small models on small batches: one thread is fastest, and stays fast when other
    processes share the CPU."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
