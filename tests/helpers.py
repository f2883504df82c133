"""Small helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import time

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


def configured_trainer(model, dataset, config=None, *, data_config=None, kl=None, monitor=None, select=None,
                       callbacks=(), **kwargs):
    """A Trainer with the standard callbacks (KL control, collapse monitors, model selection) built from
    the given sections, as ``vaekit.train`` makes one from a run config."""
    from vaekit.training import TrainConfig, Trainer
    from vaekit.training.standard import standard_callbacks

    seed = (config or TrainConfig()).seed
    cbs = standard_callbacks(model, dataset, data=data_config, kl=kl, monitor=monitor, select=select, seed=seed,
                             extra=callbacks)
    return Trainer(model, dataset, config, data_config=data_config, callbacks=cbs, **kwargs)


def callback(trainer, name: str):
    """The trainer's callback called ``name``."""
    return next(c for c in trainer.callbacks if c.name == name)


def wait_ready(proc, port: int, timeout: float = 60.0) -> None:
    """Wait until the server process ``proc`` answers 200 on ``/readyz`` at 127.0.0.1:``port``;
    AssertionError (with its output) when it exits first or does not get ready in ``timeout`` s."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"server did not become ready in {timeout:.0f} s")
