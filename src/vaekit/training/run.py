"""One call from a RunConfig to a trained model: load data, build the model, train."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vaekit.data import load_dataset
from vaekit.data.dataset import ImageDataset
from vaekit.models.base import build_model
from vaekit.training.callbacks import Callback
from vaekit.training.config import RunConfig
from vaekit.training.trainer import Trainer, TrainResult


def prepare(
    config: RunConfig,
    *,
    dataset: ImageDataset | None = None,
    callbacks: Sequence[Callback] = (),
) -> Trainer:
    """Load the data, build the model (initialised from ``config.train.seed``, the same on every
    rank) and the :class:`Trainer`; every check the trainer makes on creation runs here."""
    dc = config.data
    data = dataset or load_dataset(dc.dataset, data_dir=dc.data_dir, sources=dc.sources)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model)
    return Trainer(model, data, config.train, data_config=dc, run_dir=config.run_dir,
                   run_config=config, callbacks=callbacks)


def train(
    config: RunConfig,
    *,
    dataset: ImageDataset | None = None,
    callbacks: Sequence[Callback] = (),
    resume: bool = True,
) -> TrainResult:
    """Train ``config.model`` on ``config.data`` into ``config.run_dir``.

    The model is initialised from ``config.train.seed`` (the same on every rank).
    Pass ``dataset`` to reuse data already in memory.
    """
    return prepare(config, dataset=dataset, callbacks=callbacks).fit(resume=resume)
