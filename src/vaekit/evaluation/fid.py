"""Fréchet distance on features of vaekit's own classifier (FID without Inception).

The Fréchet distance (Heusel et al. 2017) between Gaussians fitted to the penultimate-layer
features of the extractor (:mod:`vaekit.evaluation.extractor`):

    FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

Reference statistics of a split are cached under ``<vaekit cache>/fid-stats/<dataset>/``, keyed
by a hash of the extractor's weights (never inside the extractor artifact, whose files are fixed
by its manifest). Numbers are only comparable when computed with the same extractor artifact
(same dataset, seed and epochs).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from scipy import linalg

from vaekit.atomic import atomic_write_bytes
from vaekit.data.dataset import to_unit_float
from vaekit.data.sources import default_cache_dir
from vaekit.errors import InputError, describe
from vaekit.evaluation.extractor import FeatureExtractor, check_dataset, load_extractor


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
    check_dataset(dataset)
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
    check_dataset(dataset)
    extractor = extractor if extractor is not None else load_extractor(dataset)
    mu1, s1 = image_stats(images, extractor)
    mu2, s2 = reference_stats(dataset, "test", extractor, data=data)
    return frechet_distance(mu1, s1, mu2, s2)


def fid_floor(dataset: str, extractor: FeatureExtractor | None = None, n: int = 10000, data: Any = None) -> float:
    """FID of the first ``n`` grey train images against the test split: what real data scores."""
    check_dataset(dataset)
    extractor = extractor if extractor is not None else load_extractor(dataset)
    mu1, s1 = reference_stats(dataset, "train", extractor, n=n, data=data)
    mu2, s2 = reference_stats(dataset, "test", extractor, data=data)
    return frechet_distance(mu1, s1, mu2, s2)


__all__ = ["FeatureStats", "feature_stats", "fid", "fid_floor", "frechet_distance", "image_stats", "reference_stats"]
