"""Datasets: fetched, checksummed, cached, held in memory.

``load_dataset(name)`` returns an :class:`ImageDataset`; :class:`BatchLoader` serves
batches from it with shuffling and binarization.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from vaekit.data.dataset import BINARIZE_MODES, BatchLoader, ImageDataset, ImageSplit, eval_loader
from vaekit.data.dsprites import load_dsprites
from vaekit.data.fashion import fetch_fashion_mnist, load_fashion_mnist
from vaekit.data.mnist import fetch_mnist, load_mnist
from vaekit.errors import ConfigError

LOADERS: dict[str, Callable[..., ImageDataset]] = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "dsprites": load_dsprites,
}


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    sources: Sequence[str] | str | None = None,
) -> ImageDataset:
    """Load a dataset by name (one of ``LOADERS``)."""
    if name not in LOADERS:
        raise ConfigError(f"dataset must be one of {sorted(LOADERS)}, got {name!r}")
    return LOADERS[name](data_dir=data_dir, cache_dir=cache_dir, sources=sources)


__all__ = [
    "BINARIZE_MODES", "LOADERS", "BatchLoader", "ImageDataset", "ImageSplit", "eval_loader",
    "fetch_fashion_mnist", "fetch_mnist", "load_dataset", "load_dsprites", "load_fashion_mnist",
    "load_mnist",
]
