"""Hooks into the training loop, and the loop as the hooks see it.

A callback subclasses :class:`Callback` and overrides what it needs. Every hook receives the
loop as a :class:`TrainingLoop`: the few things a callback may read (state, model, device,
process group, step budget) and ask for (log a record, stop, recover from a checkpoint). The
callbacks never see the :class:`~vaekit.training.trainer.Trainer` class itself, so they do not
depend on it.

A callback's ``state_dict`` is stored in every checkpoint under its ``name`` and handed back
through ``load_state_dict`` on resume, so stateful monitors resume exactly. Its ``summary()``
(when not None) is returned in ``TrainResult.summaries[name]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from vaekit.data.dataset import Binarize, ImageSplit, eval_loader

if TYPE_CHECKING:
    from vaekit.models.base import BaseModel
    from vaekit.training.distributed import DistInfo


@dataclass
class TrainState:
    """Where training stands: ``step`` optimizer steps done; the next batch is ``batch`` of ``epoch``."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class HeldOut:
    """Held-out examples a callback scores on, made into tensors on the loop's device at set-up:
    the first ``n`` of ``split`` (all when None) under one fixed ``binarize`` draw from ``seed``
    (drawn on that device, as an evaluation pass would)."""

    split: ImageSplit
    binarize: Binarize = "none"
    seed: int = 0
    n: int | None = None

    def tensors(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(x (n, C, H, W) float in [0, 1], y (n,) int64) on ``device``."""
        held = self.split.subset(min(self.n, len(self.split))) if self.n else self.split
        return next(eval_loader(held, len(held), self.binarize, self.seed, device).epoch(0))


class TrainingLoop(Protocol):
    """What the training loop offers its callbacks."""

    model: BaseModel
    device: torch.device
    dist: DistInfo
    total_steps: int  # optimizer steps the run takes in all (epochs x batches, capped by max_steps)
    steps_per_epoch: int

    @property
    def state(self) -> TrainState: ...

    @property
    def stop_requested(self) -> str | None:
        """Why training was asked to stop (None: it was not)."""
        ...

    def log_record(self, record: dict[str, Any]) -> None:
        """Write a record to the metrics log (rank 0; others ignore it)."""
        ...

    def request_stop(self, reason: str) -> None:
        """End training after the current step (the model is still saved)."""
        ...

    def request_recover(self, before_step: int, reason: str, remedy: Callable[[TrainingLoop], str]) -> None:
        """After the current step, reload the newest checkpoint older than ``before_step`` and call
        ``remedy(loop)``, which makes a change and says what it changed."""
        ...


class Callback:
    """Base class: every hook does nothing."""

    name: str = "callback"
    keep_state_on_recover: bool = False  # True: a collapse recovery does not reload this callback's state

    def setup(self, loop: TrainingLoop) -> None:
        """Called once the device, model, optimizers and step budget are known, before any resumed
        state is loaded (build what depends on the device or the number of steps here)."""

    def on_fit_start(self, loop: TrainingLoop) -> None:
        """Called once the model, optimizer and any resumed state are in place."""

    def on_epoch_start(self, loop: TrainingLoop, epoch: int) -> None:
        """Called before the first (or, on resume, the next) batch of an epoch."""

    def forward_kwargs(self, loop: TrainingLoop) -> dict[str, Any]:
        """Extra keyword arguments for this step's forward call (e.g. ``kl_control``)."""
        return {}

    def extra_terms(self, out: Any) -> dict[str, torch.Tensor]:
        """Tensors of this step's model output to log as lists (reduced over ranks with the loss
        terms, in the step's one host sync), e.g. the KL of each latent dimension."""
        return {}

    def on_step_end(self, loop: TrainingLoop, record: dict[str, Any]) -> None:
        """Called after each optimizer step with its metrics record (add keys to log them)."""

    def on_eval_end(self, loop: TrainingLoop, record: dict[str, Any]) -> None:
        """Called after each evaluation on the test split with its record."""

    def on_epoch_end(self, loop: TrainingLoop, epoch: int) -> None:
        """Called at the end of each epoch, after evaluation and before the epoch checkpoint."""

    def checkpoint_fields(self) -> dict[str, Any]:
        """Figures stored with each checkpoint in the run's index (``checkpoints/index.json``)."""
        return {}

    def finish(self, loop: TrainingLoop) -> bool:
        """Called after the last step, before the final evaluation. Return True when it changed the
        model's weights (the final evaluation then scores the new ones)."""
        return False

    def model_metadata(self) -> dict[str, Any]:
        """Keys added to the saved model's metadata and metrics."""
        return {}

    def on_fit_end(self, loop: TrainingLoop) -> None:
        """Called after the final model is saved."""

    def close(self) -> None:
        """Called when the run ends, also on an error: release files, bars, writers."""

    def summary(self) -> dict[str, Any] | None:
        """What this callback reports in ``TrainResult.summaries[name]`` (None: nothing)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
