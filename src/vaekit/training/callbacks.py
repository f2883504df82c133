"""Hooks into the training loop. Subclass :class:`Callback` and override what you need.

A callback's ``state_dict`` is stored in every checkpoint under its ``name`` and
handed back through ``load_state_dict`` on resume, so stateful monitors resume
exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vaekit.training.trainer import Trainer


class Callback:
    """Base class: every hook does nothing."""

    name: str = "callback"
    keep_state_on_recover: bool = False  # True: a collapse recovery does not reload this callback's state

    def on_fit_start(self, trainer: Trainer) -> None:
        """Called once the model, optimizer and any resumed state are in place."""

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Called after each optimizer step with its metrics record (add keys to log them)."""

    def on_eval_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Called after each evaluation on the test split with its record."""

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        """Called at the end of each epoch, after evaluation and before the epoch checkpoint."""

    def forward_kwargs(self, trainer: Trainer) -> dict[str, Any]:
        """Extra keyword arguments for this step's forward call (e.g. ``kl_control``)."""
        return {}

    def on_fit_end(self, trainer: Trainer) -> None:
        """Called after the final model is saved."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
