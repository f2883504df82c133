"""Small helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import torch


def rand_images(n: int, shape: tuple[int, ...] = (1, 28, 28), seed: int = 1) -> torch.Tensor:
    """``n`` uniform grey images (n, *shape) in [0, 1), the same for the same ``n`` and ``seed``."""
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))
