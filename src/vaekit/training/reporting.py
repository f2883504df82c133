"""Callbacks that show a run as it goes: the progress bar and TensorBoard.

The trainer adds them last (after every callback that adds keys to a record) from
``train.progress`` and ``train.tensorboard``; on rank 0 only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vaekit.errors import ConfigError
from vaekit.training.callbacks import Callback

if TYPE_CHECKING:
    from vaekit.training.callbacks import TrainingLoop
    from vaekit.training.config import TrainConfig

_SKIP = ("type", "step", "epoch")


def tensorboard_writer_class(mode: str) -> Any:
    """``SummaryWriter`` when TensorBoard is wanted and installed; None when it is off (or ``auto``
    and not installed); ConfigError when it is ``on`` and not installed."""
    if mode == "off":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if mode == "on":
            raise ConfigError("train.tensorboard is 'on' but tensorboard is not installed "
                              "(pip install 'vaekit[tensorboard]')") from None
        return None
    return SummaryWriter


class TensorBoardLogger(Callback):
    """Every numeric key of the train and eval records as a scalar (``train/<key>``, ``test/<key>``)
    under ``RUN/tensorboard``."""

    name = "tensorboard"

    def __init__(self, run_dir: str | Path, writer_class: Any):
        self.path, self.writer_class, self.writer = Path(run_dir) / "tensorboard", writer_class, None

    def on_fit_start(self, loop: TrainingLoop) -> None:
        self.writer = self.writer_class(str(self.path))

    def _scalars(self, prefix: str, record: dict[str, Any], step: int) -> None:
        if self.writer is not None:
            for k, v in record.items():
                if k not in _SKIP and isinstance(v, int | float):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def on_step_end(self, loop: TrainingLoop, record: dict[str, Any]) -> None:
        self._scalars("train", record, loop.state.step)

    def on_eval_end(self, loop: TrainingLoop, record: dict[str, Any]) -> None:
        self._scalars("test", record, loop.state.step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class ProgressBar(Callback):
    """One tqdm bar per epoch with the first four loss terms, refreshed every 20 steps."""

    name = "progress"

    def __init__(self, epochs: int):
        self.epochs, self.bar, self.names = epochs, None, None

    def on_epoch_start(self, loop: TrainingLoop, epoch: int) -> None:
        from tqdm.auto import tqdm

        self.close()
        self.bar = tqdm(total=loop.steps_per_epoch, initial=loop.state.batch, desc=f"epoch {epoch + 1}/{self.epochs}",
                        mininterval=0.5, leave=False, dynamic_ncols=True)

    def on_step_end(self, loop: TrainingLoop, record: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if loop.state.step % 20 == 0:
            terms = [k for k, v in record.items() if k not in _SKIP and isinstance(v, float)][:4]
            self.bar.set_postfix({k: f"{record[k]:.2f}" for k in terms}, refresh=False)

    def on_epoch_end(self, loop: TrainingLoop, epoch: int) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def reporting_callbacks(config: TrainConfig, run_dir: str | Path, is_main: bool) -> list[Callback]:
    """The progress bar and TensorBoard logger ``config`` asks for (none off rank 0)."""
    if not is_main:
        return []
    out: list[Callback] = []
    writer = tensorboard_writer_class(config.tensorboard)
    if writer is not None:
        out.append(TensorBoardLogger(run_dir, writer))
    if config.progress:
        out.append(ProgressBar(config.epochs))
    return out
