"""Small helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import torch

from vaekit.training import Callback


def rand_images(n: int, shape: tuple[int, ...] = (1, 28, 28), seed: int = 1) -> torch.Tensor:
    """``n`` uniform grey images (n, *shape) in [0, 1), the same for the same ``n`` and ``seed``."""
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


class Crash(Callback):
    """Simulates a crash (kill, power loss) right after step ``at_step``."""

    name = "crash"

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_step_end(self, trainer, record) -> None:
        if record["step"] == self.at_step:
            raise KeyboardInterrupt(f"simulated crash at step {self.at_step}")
