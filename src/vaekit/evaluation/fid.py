"""Fréchet distance on features of a small classifier trained by vaekit (FID without Inception).

Inception weights cannot be downloaded here, and Inception features of 28x28 digits are a poor
fit anyway. vaekit trains a LeNet-style classifier on the dataset's train split, reproducibly
from a seed (:func:`train_extractor`, or ``vaekit fid-extractor train mnist``), and computes the
Fréchet distance (Heusel et al. 2017) between Gaussians fitted to its penultimate-layer features:

    FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

The extractor is saved as an artifact of kind ``fid-extractor`` (:mod:`vaekit.artifact`: config,
weights, ``metrics.json`` with the test accuracy, and a manifest of their hashes, verified on
load), by default under ``<vaekit cache>/extractors/<dataset>/``. Reference statistics of a split
are cached under ``<vaekit cache>/fid-stats/<dataset>/``, keyed by a hash of the weights (never
inside the artifact, whose files are fixed by its manifest). Numbers are only comparable when
computed with the same extractor artifact (same dataset, seed and epochs).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from scipy import linalg
from torch import nn

from vaekit.artifact import Artifact, config_from_artifact, load_module_state, read_artifact, write_artifact
from vaekit.atomic import atomic_write_bytes
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


def _check_dataset(dataset: Any) -> str:
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
    _check_dataset(dataset)
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
    _check_dataset(dataset)
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
class FeatureStats:
    """Running mean and covariance of feature batches (float64 sums): ``update``, ``compute``, ``reset``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.total: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def update(self, features: torch.Tensor) -> None:
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] == 0:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise InputError(f"features must be a non-empty tensor (N, F), got {got}")
        f = features.detach().double().cpu()
        if self.total is not None and f.shape[1] != self.total.shape[0]:
            raise InputError(f"features have {f.shape[1]} columns, earlier batches had {self.total.shape[0]}")
        if not torch.isfinite(f).all():
            raise InputError("features hold non-finite values")
        self.total = f.sum(0) if self.total is None else self.total + f.sum(0)
        self.outer = f.T @ f if self.outer is None else self.outer + f.T @ f
        self.n += f.shape[0]

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (F,), sigma (F, F)): the mean and the unbiased covariance, float64."""
        if self.n < 2 or self.total is None or self.outer is None:
            raise InputError(f"feature statistics need at least 2 examples, got {self.n}")
        mu = self.total / self.n
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), sigma.numpy()


def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and unbiased covariance (F, F) of features (N, F), float64 numpy arrays."""
    acc = FeatureStats()
    acc.update(torch.as_tensor(np.asarray(features)) if isinstance(features, np.ndarray) else features)
    return acc.compute()


def _as_stats(mu: Any, sigma: Any, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.atleast_1d(np.asarray(mu, dtype=np.float64)), np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise InputError(f"mu{which} must be (F,) and sigma{which} (F, F), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise InputError(f"mu{which} and sigma{which} must be finite")
    return mu, sigma


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6,
                     max_imag: float = 1e-3) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr(sqrtm(sigma1 sigma2))``. When the matrix
    square root is not finite (a singular product), it is retried with ``eps * I`` added to both
    covariances; a square root whose diagonal has an imaginary part above ``max_imag`` raises
    InputError (the covariances are not positive semi-definite enough to trust the number); a
    smaller imaginary part (round-off) is dropped. These guards follow pytorch-fid.
    """
    mu1, sigma1 = _as_stats(mu1, sigma1, "1")
    mu2, sigma2 = _as_stats(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise InputError(f"the two statistics have different dimensions: {mu1.shape[0]} and {mu2.shape[0]}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # a singular product only warns; a non-finite root is handled below, an inexact one is checked
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > max_imag:
            raise InputError(f"the matrix square root has an imaginary component of {imag:.3g} (> {max_imag}); "
                             "the covariances are ill-conditioned: use more samples")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _check_images(images: Any, extractor: FeatureExtractor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"images must be a tensor (N, C, H, W) with values in [0, 1], got {got}")
    if images.shape[0] < 2:
        raise InputError(f"FID needs at least 2 images, got {images.shape[0]}")
    if not images.is_floating_point():
        raise InputError(f"images must be floats in [0, 1], got dtype {images.dtype}")
    lo, hi = torch.aminmax(images.detach())
    if lo < 0 or hi > 1:
        raise InputError(f"images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return extractor._check(images)


def image_stats(images: torch.Tensor | Iterable[torch.Tensor], extractor: FeatureExtractor
                ) -> tuple[np.ndarray, np.ndarray]:
    """Feature statistics of images (N, C, H, W) in [0, 1], or of an iterable of such batches."""
    acc = FeatureStats()
    batches = [images] if isinstance(images, torch.Tensor) else images
    for batch in batches:
        acc.update(extractor.features(_check_images(batch, extractor)))
    return acc.compute()


def _stats_file(extractor: FeatureExtractor, split: str, n: int | None) -> Path | None:
    """``<vaekit cache>/fid-stats/<dataset>/stats-<split>[-first<n>]-<weights hash>.safetensors``, or
    None for an extractor not loaded from an artifact."""
    if extractor.artifact is None:
        return None
    suffix = f"-first{n}" if n is not None else ""
    name = f"stats-{split}{suffix}-{extractor.weights_hash()}.safetensors"
    return default_cache_dir() / "fid-stats" / extractor.dataset / name


def reference_stats(dataset: str, split: str = "test", extractor: FeatureExtractor | None = None,
                    n: int | None = None, data: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Feature statistics of a dataset split's grey images (the first ``n`` when given), cached.

    The cache file sits in ``<vaekit cache>/fid-stats/<dataset>/`` and is keyed by a hash of the
    extractor's weights, so retraining the extractor never reuses stale statistics; an unreadable
    cache file is recomputed. An extractor not loaded from disk gets no cache. ``data`` reuses an
    ImageDataset already in memory.
    """
    _check_dataset(dataset)
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test', got {describe(split)}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 2):
        raise InputError(f"n must be an integer >= 2 or None, got {describe(n)}")
    extractor = extractor if extractor is not None else load_extractor(dataset)
    cache = _stats_file(extractor, split, n)
    if cache is not None and cache.is_file():
        try:
            saved = load_file(str(cache))
            return saved["mu"].numpy(), saved["sigma"].numpy()
        except (SafetensorError, KeyError, OSError):
            pass  # a damaged cache file: recompute and replace it
    from vaekit.data import load_dataset

    ds = data if data is not None else load_dataset(dataset)
    part = getattr(ds, split).subset(n)
    mu, sigma = image_stats(to_unit_float(part.images), extractor)
    if cache is not None:
        atomic_write_bytes(cache, save({"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)}))
    return mu, sigma


def fid(images: torch.Tensor, dataset: str, extractor: FeatureExtractor | None = None, data: Any = None) -> float:
    """FID of images (N, C, H, W) in [0, 1] against ``dataset``'s test split, on the vaekit extractor.

    Use at least a few thousand images (the estimate is biased upwards for small N; the
    suite reports 10,000 samples). ``extractor`` defaults to :func:`load_extractor(dataset)`.
    """
    _check_dataset(dataset)
    extractor = extractor if extractor is not None else load_extractor(dataset)
    mu1, s1 = image_stats(images, extractor)
    mu2, s2 = reference_stats(dataset, "test", extractor, data=data)
    return frechet_distance(mu1, s1, mu2, s2)


def fid_floor(dataset: str, extractor: FeatureExtractor | None = None, n: int = 10000, data: Any = None) -> float:
    """FID of the first ``n`` grey train images against the test split: what real data scores."""
    _check_dataset(dataset)
    extractor = extractor if extractor is not None else load_extractor(dataset)
    mu1, s1 = reference_stats(dataset, "train", extractor, n=n, data=data)
    mu2, s2 = reference_stats(dataset, "test", extractor, data=data)
    return frechet_distance(mu1, s1, mu2, s2)


__all__ = [
    "ExtractorConfig", "FeatureExtractor", "FeatureStats", "default_extractor_dir", "feature_stats", "fid",
    "fid_floor", "frechet_distance", "image_stats", "load_extractor", "reference_stats", "save_extractor",
    "split_accuracy", "train_extractor",
]
