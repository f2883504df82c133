"""The feature extractor behind vaekit's FID: a LeNet-style classifier trained by vaekit.

Inception weights cannot be downloaded here, and Inception features of 28x28 digits are a poor
fit anyway. vaekit trains a LeNet-style classifier on the dataset's train split, reproducibly
from a seed (:func:`train_extractor`, or ``vaekit fid-extractor train mnist``); its
penultimate-layer features are what :mod:`vaekit.evaluation.fid` compares. The extractor is saved
as an artifact of kind ``fid-extractor`` (:mod:`vaekit.artifact`: config, weights,
``metrics.json`` with the test accuracy, and a manifest of their hashes, verified on load), by
default under ``<vaekit cache>/extractors/<dataset>/``.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vaekit.artifact import Artifact, config_from_artifact, load_module_state, read_artifact, write_artifact
from vaekit.data.dataset import ImageSplit, mix_seed, to_unit_float
from vaekit.data.sources import default_cache_dir
from vaekit.errors import ConfigError, InputError, ModelFormatError, describe

EXTRACTOR_KIND = "fid-extractor"  # the artifact kind (format v1 folders said format "vaekit-fid-extractor")


# -- the feature extractor -----------------------------------------------------------------------
@dataclass
class ExtractorConfig:
    """Architecture and training recipe of a :class:`FeatureExtractor`."""

    dataset: str = "mnist"  # the dataset whose train split it was trained on
    input_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W), H and W divisible by 4
    num_classes: int = 10  # classifier outputs
    channels: tuple[int, int] = (32, 64)  # the two 5x5 convolutions (each followed by 2x2 max-pooling)
    feature_dim: int = 128  # penultimate layer width: the FID features
    dropout: float = 0.5  # before the last layer, during training
    epochs: int = 6  # passes over the train split
    batch_size: int = 128
    lr: float = 1e-3  # Adam
    binarize_prob: float = 0.5  # chance each training image is replaced by a Bernoulli draw of itself
    seed: int = 0  # init, order, dropout and augmentation

    def __post_init__(self) -> None:
        if len(self.input_shape) != 3 or self.input_shape[1] % 4 or self.input_shape[2] % 4:
            raise ConfigError(f"input_shape must be (C, H, W) with H and W divisible by 4, got {self.input_shape!r}")
        for name in ("num_classes", "feature_dim", "epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {describe(v)}")
        if not 0 <= self.dropout < 1 or not 0 <= self.binarize_prob <= 1:
            raise ConfigError(f"dropout must be in [0, 1) and binarize_prob in [0, 1], got {self.dropout!r}, "
                              f"{self.binarize_prob!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")


class FeatureExtractor(nn.Module):
    """LeNet-style classifier: [5x5 conv, ReLU, 2x2 max-pool] x 2, Linear -> ReLU (features), Linear.

    Input images (N, C, H, W) in [0, 1]. ``features(x)`` -> (N, feature_dim) penultimate
    activations, ``predict(x)`` -> (N,) class ids. ``test_accuracy`` is the accuracy on the
    dataset's test split measured after training (None until measured). ``artifact`` is the
    artifact it was loaded from (None for one trained in this process): reference statistics are
    cached only for an extractor loaded from disk.
    """

    def __init__(self, config: ExtractorConfig, artifact: Artifact | None = None):
        super().__init__()
        self.config = config
        self.artifact = artifact
        c, h, w = config.input_shape
        c1, c2 = config.channels
        self.conv1 = nn.Conv2d(c, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2)
        self.fc = nn.Linear(c2 * (h // 4) * (w // 4), config.feature_dim)
        self.drop = nn.Dropout(config.dropout)
        self.out = nn.Linear(config.feature_dim, config.num_classes)
        self.test_accuracy: float | None = None if artifact is None else (artifact.metrics or {}).get("test_accuracy")

    @property
    def dataset(self) -> str:
        return self.config.dataset

    def _check(self, x: Any) -> torch.Tensor:
        shape = tuple(self.config.input_shape)
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"images must be a tensor (N, {', '.join(map(str, shape))}) for the {self.dataset} "
                             f"extractor, got {got}")
        if not x.is_floating_point():
            raise InputError(f"images must be floats in [0, 1], got dtype {x.dtype}")
        return x

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) / 0.5
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes)."""
        return self.out(self.drop(self._body(self._check(x))))

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Penultimate activations (N, feature_dim), float32, computed in eval mode in batches."""
        self._check(x)
        was = self.training
        self.eval()
        dev = next(self.parameters()).device
        out = torch.cat([self._body(x[i : i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)])
        self.train(was)
        return out

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Predicted class ids (N,) int64."""
        self._check(x)
        was = self.training
        self.eval()
        dev = next(self.parameters()).device
        out = torch.cat([self.out(self._body(x[i : i + batch_size].to(dev))).argmax(1).cpu()
                         for i in range(0, len(x), batch_size)])
        self.train(was)
        return out

    def weights_hash(self) -> str:
        """SHA-256 (first 16 hex digits) of the weights: keys the cached reference statistics."""
        h = hashlib.sha256()
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def default_extractor_dir(dataset: str) -> Path:
    """``<vaekit cache>/extractors/<dataset>`` (the cache is ``$VAEKIT_CACHE`` or ``~/.cache/vaekit``)."""
    return default_cache_dir() / "extractors" / dataset


def check_dataset(dataset: Any) -> str:
    from vaekit.data import LOADERS

    if dataset not in LOADERS:
        raise InputError(f"dataset must be one of {sorted(LOADERS)}, got {describe(dataset)}")
    return dataset


def save_extractor(extractor: FeatureExtractor, path: str | os.PathLike, metrics: dict[str, Any]) -> Path:
    """Write the extractor as an artifact folder (atomically): config, weights, ``metrics``, manifest."""
    return write_artifact(path, EXTRACTOR_KIND, asdict(extractor.config), extractor.state_dict(), {}, metrics)


def load_extractor(dataset: str, path: str | os.PathLike | None = None) -> FeatureExtractor:
    """Load the trained extractor for ``dataset`` (from ``path`` or the default cache location).

    Raises ModelFormatError, telling the user to run ``vaekit fid-extractor train <dataset>``,
    when no artifact exists; ArtifactIntegrityError when a file differs from the manifest;
    ModelFormatError naming the field or tensor for a config or weights that do not fit.
    A format v1 folder (no manifest) loads with a LegacyArtifactWarning.
    """
    check_dataset(dataset)
    folder = Path(path) if path is not None else default_extractor_dir(dataset)
    if not (folder / "config.json").is_file() and not (folder / "manifest.json").is_file():
        raise ModelFormatError(f"no FID feature extractor for {dataset!r} at {folder}; train one with "
                               f"`vaekit fid-extractor train {dataset}` (about 5 minutes on 2 CPU cores)"
                               + (f" --out {folder}" if path is not None else ""))
    art = read_artifact(folder, EXTRACTOR_KIND, allow_legacy=True)
    config = config_from_artifact(ExtractorConfig, art)
    if config.dataset != dataset:
        raise ModelFormatError(f"{folder} holds an extractor for {config.dataset!r}, not {dataset!r}")
    extractor = FeatureExtractor(config, artifact=art)
    load_module_state(extractor, art)
    return extractor.eval()


def train_extractor(
    dataset: str,
    out_dir: str | os.PathLike | None = None,
    seed: int = 0,
    epochs: int = 6,
    *,
    data: Any = None,
    threads: int | None = None,
    progress: bool = False,
) -> Path:
    """Train the LeNet-style extractor on ``dataset``'s train split and save it; return the folder.

    Reproducible: init, batch order, dropout and augmentation all derive from ``seed`` (CPU runs
    are bit-identical). Each training image is, with probability 1/2, replaced by a Bernoulli draw
    of itself, so features of binary samples (dynamically binarized models) and grey test images
    are comparable. ``data`` reuses an :class:`~vaekit.data.ImageDataset` already in memory.
    The test accuracy on the grey test split is stored in ``metrics.json``.
    """
    check_dataset(dataset)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {describe(seed)}")
    from vaekit.data import load_dataset

    ds = data if data is not None else load_dataset(dataset)
    if threads:
        torch.set_num_threads(threads)
    num_classes = int(ds.train.labels.max().item()) + 1
    config = ExtractorConfig(dataset=dataset, input_shape=tuple(ds.image_shape), num_classes=num_classes,
                             epochs=epochs, seed=seed)
    t0 = time.perf_counter()
    with torch.random.fork_rng():  # init and dropout use the global stream: leave the caller's untouched
        model, steps = _fit_extractor(config, ds, progress, t0)
    model.eval()
    acc = split_accuracy(model, ds.test)
    model.test_accuracy = acc
    metrics = {"test_accuracy": acc, "test_examples": len(ds.test), "train_examples": len(ds.train), "steps": steps,
               "train_time_s": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
               "dataset_provenance": getattr(ds, "provenance", "")}
    folder = Path(out_dir) if out_dir is not None else default_extractor_dir(dataset)
    save_extractor(model, folder, metrics)
    return folder


def _fit_extractor(config: ExtractorConfig, ds: Any, progress: bool, t0: float) -> tuple[FeatureExtractor, int]:
    g = torch.Generator().manual_seed(mix_seed(config.seed, 0xF1D))
    torch.manual_seed(mix_seed(config.seed, 0xF1D, 1))
    model = FeatureExtractor(config)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    x_all, y_all = to_unit_float(ds.train.images), ds.train.labels
    n = len(y_all)
    steps = 0
    for epoch in range(config.epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        running = 0.0
        for i in range(0, n, config.batch_size):
            idx = perm[i : i + config.batch_size]
            x, y = x_all[idx], y_all[idx]
            flip = torch.rand(len(idx), generator=g) < config.binarize_prob
            if flip.any():
                x = x.clone()
                x[flip] = torch.bernoulli(x[flip], generator=g)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item()
            steps += 1
        if progress:
            print(f"epoch {epoch + 1}/{config.epochs}: train loss {running / math.ceil(n / config.batch_size):.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return model, steps


def split_accuracy(extractor: FeatureExtractor, split: ImageSplit) -> float:
    """Fraction of a split's grey images classified correctly."""
    pred = extractor.predict(to_unit_float(split.images))
    return float((pred == split.labels).double().mean().item())


# -- statistics and the distance ------------------------------------------------------------------


__all__ = ["EXTRACTOR_KIND", "ExtractorConfig", "FeatureExtractor", "default_extractor_dir", "load_extractor",
           "save_extractor", "split_accuracy", "train_extractor"]
