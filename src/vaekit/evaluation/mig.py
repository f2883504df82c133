"""Mutual Information Gap (Chen et al. 2018) with its two estimators in use. Every result names its estimator.

MIG = mean over factors v_k of [I(z_j*; v_k) - I(z_j'; v_k)] / H(v_k), where j* and j' are the
latent dimensions with the largest and second largest mutual information with v_k.

* ``histogram`` (disentanglement_lib, Locatello et al. 2019): the *mean* representation
  E[z|x] of sampled images, each dimension discretized into 20 equal-width bins over its range,
  discrete mutual information between bins and factor classes, normalized by the factor's
  empirical entropy.
* ``sampling`` (Chen et al. 2018, their reference code for dSprites): one z ~ q(z|x) per image;
  H(z_j) and H(z_j | v_k) are estimated by Monte Carlo with the aggregate posterior
  q(z_j) = (1/N) sum_n q(z_j|x_n) over the images (all of them in Chen et al.), conditional
  entropies averaged over the factor's values; H(v_k) = log(number of values); factors scale,
  orientation, x and y (shape is left out, as in their code).

The two estimators give different numbers for the same model (the histogram one discretizes
means, the sampling one integrates the posterior noise), so a MIG is meaningless without its name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vaekit.errors import InputError, describe

HISTOGRAM = "histogram"
SAMPLING = "sampling"
ESTIMATORS = {
    HISTOGRAM: "histogram estimator (disentanglement_lib): mean codes, 20 equal-width bins, discrete MI / H(v_k)",
    SAMPLING: "sampling estimator (Chen et al. 2018): z ~ q(z|x), Monte Carlo entropies, H(v_k) = log #values",
}


@dataclass
class MIGResult:
    """A MIG score with everything needed to read it: the estimator, per-factor gaps, the MI matrix."""

    estimator: str  # "histogram" or "sampling"
    score: float  # mean normalized gap over factors
    factor_names: list[str]
    per_factor: list[float]  # normalized gap of each factor
    mutual_info: list[list[float]]  # (D, K) nats: I(z_j; v_k)
    factor_entropy: list[float]  # (K,) nats: the normalizers H(v_k)
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"estimator": self.estimator, "description": ESTIMATORS[self.estimator], f"mig_{self.estimator}":
                self.score, "factor_names": self.factor_names, "per_factor": self.per_factor,
                "mutual_info": self.mutual_info, "factor_entropy": self.factor_entropy, **self.notes}


def _gap(mi: np.ndarray, entropy: np.ndarray) -> np.ndarray:
    """Normalized gap per factor from MI (D, K) and entropies (K,)."""
    if mi.shape[0] < 2:
        raise InputError(f"MIG needs at least 2 latent dimensions, got {mi.shape[0]}")
    top = -np.sort(-mi, axis=0)  # descending over latent dims
    return (top[0] - top[1]) / entropy


def _check_factors(factors: Any, n: int, names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    f = np.asarray(factors.cpu() if isinstance(factors, torch.Tensor) else factors)
    if f.ndim != 2 or f.shape[0] != n or not np.issubdtype(f.dtype, np.integer):
        raise InputError(f"factors must be an integer array ({n}, K) of factor classes, got {describe(factors)} "
                         f"with shape {f.shape}")
    names = list(names) if names is not None else [f"factor{k}" for k in range(f.shape[1])]
    if len(names) != f.shape[1]:
        raise InputError(f"factor_names must have {f.shape[1]} names, got {names!r}")
    return f.astype(np.int64), names


def discrete_mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    """I(a; b) in nats of two integer label arrays (N,), from their joint histogram (plug-in estimate)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise InputError(f"a and b must be 1-D label arrays of one non-zero length, got {a.shape} and {b.shape}")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai, bi), 1.0)
    p = joint / a.size
    pa, pb = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float(np.sum(p[nz] * (np.log(p[nz]) - np.log((pa @ pb)[nz]))))


def discretize(codes: np.ndarray, num_bins: int = 20) -> np.ndarray:
    """Each column of codes (N, D) into ``num_bins`` equal-width bins over its range (disentanglement_lib)."""
    out = np.zeros(codes.shape, dtype=np.int64)
    for j in range(codes.shape[1]):
        edges = np.histogram(codes[:, j], num_bins)[1]
        out[:, j] = np.digitize(codes[:, j], edges[:-1])
    return out


def mig_histogram(codes: Any, factors: Any, factor_names: Sequence[str] | None = None,
                  num_bins: int = 20) -> MIGResult:
    """Histogram MIG of mean codes (N, D) against factor classes (N, K) (disentanglement_lib's estimator).

    Factors with a single value (zero entropy) must be left out by the caller.
    """
    c = np.asarray(codes.detach().cpu() if isinstance(codes, torch.Tensor) else codes, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] < 2:
        raise InputError(f"codes must be an array (N >= 2, D), got shape {c.shape}")
    if not np.isfinite(c).all():
        raise InputError("codes hold non-finite values")
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
        raise InputError(f"num_bins must be an integer >= 2, got {describe(num_bins)}")
    f, names = _check_factors(factors, c.shape[0], factor_names)
    binned = discretize(c, num_bins)
    D, K = c.shape[1], f.shape[1]
    mi = np.array([[discrete_mutual_info(binned[:, j], f[:, k]) for k in range(K)] for j in range(D)])
    entropy = np.array([discrete_mutual_info(f[:, k], f[:, k]) for k in range(K)])
    if (entropy <= 0).any():
        bad = [names[k] for k in range(K) if entropy[k] <= 0]
        raise InputError(f"factors {bad} take a single value in these examples (zero entropy); leave them out")
    gaps = _gap(mi, entropy)
    return MIGResult(HISTOGRAM, float(gaps.mean()), names, gaps.tolist(), mi.tolist(), entropy.tolist(),
                     {"num_bins": num_bins, "n": int(c.shape[0])})


@torch.no_grad()
def marginal_entropies(
    samples: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, n_samples: int = 10000,
    generator: torch.Generator | None = None, chunk: int | None = None,
) -> torch.Tensor:
    """H(z_j) for each latent dim under q(z_j) = (1/N) sum_n N(z_j; mean_nj, exp(logvar_nj)): (D,) nats.

    ``samples`` (N, D) hold one z ~ q(z|x_n) per mixture component; ``n_samples`` of them (all when
    fewer) are drawn without replacement and -log q(z_j) is averaged over them (Chen et al. 2018,
    ``estimate_entropies``). Memory is O(chunk * N * D); by default chunk * N * D is about 4 million.
    """
    N, D = mean.shape
    chunk = chunk or max(1, 4_000_000 // (N * D))
    pick = torch.randperm(N, generator=generator)[: min(n_samples, N)]
    z = samples[pick].double()  # (S, D)
    mean, logvar = mean.double(), logvar.double()
    inv_var = torch.exp(-logvar)
    norm = -0.5 * (logvar + math.log(2 * math.pi))  # (N, D)
    total = torch.zeros(D, dtype=torch.float64)
    for i in range(0, z.shape[0], chunk):
        zi = z[i : i + chunk, None, :]  # (c, 1, D)
        log_q = norm[None] - 0.5 * (zi - mean[None]) ** 2 * inv_var[None]  # (c, N, D)
        total -= (torch.logsumexp(log_q, dim=1) - math.log(N)).sum(0)
    return total / z.shape[0]


@torch.no_grad()
def mig_sampling(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    factors: Any,
    factor_sizes: Sequence[int],
    factor_names: Sequence[str] | None = None,
    n_samples: int = 10000,
    generator: torch.Generator | None = None,
) -> MIGResult:
    """Sampling-based MIG (Chen et al. 2018) from the posteriors (N, D) of images with factor classes (N, K).

    For the published protocol the images are the whole factor grid; a uniform subsample gives an
    estimate of the same quantity with fewer mixture components. ``factor_sizes[k]`` is the number
    of values of factor k: H(v_k) = log(factor_sizes[k]). H(z_j | v_k) averages, over the values a,
    the entropy of the aggregate posterior of the images with v_k = a, weighted by how many there are.
    """
    if not isinstance(mean, torch.Tensor) or mean.ndim != 2 or mean.shape[0] < 2:
        raise InputError(f"mean must be a tensor (N >= 2, D), got {describe(mean)}")
    if not isinstance(logvar, torch.Tensor) or logvar.shape != mean.shape:
        raise InputError(f"logvar must be a tensor of mean's shape {tuple(mean.shape)}, got {describe(logvar)}")
    f, names = _check_factors(factors, mean.shape[0], factor_names)
    sizes = list(factor_sizes)
    if len(sizes) != f.shape[1] or any(isinstance(s, bool) or not isinstance(s, int) or s < 2 for s in sizes):
        raise InputError(f"factor_sizes must be {f.shape[1]} integers >= 2, got {describe(factor_sizes)}")
    if (f.min(0) < 0).any() or (f.max(0) >= np.array(sizes)).any():
        raise InputError("factor classes must lie in [0, factor_sizes[k])")
    mean, logvar = mean.detach().cpu().double(), logvar.detach().cpu().double()
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float64)
    samples = mean + torch.exp(0.5 * logvar) * noise  # one z per image, shared by every term
    h_marg = marginal_entropies(samples, mean, logvar, n_samples, generator)  # (D,)
    D, K = mean.shape[1], f.shape[1]
    h_cond = torch.zeros(K, D, dtype=torch.float64)
    for k in range(K):
        for a in range(sizes[k]):
            idx = torch.from_numpy(np.nonzero(f[:, k] == a)[0])
            if len(idx) == 0:
                continue
            h = marginal_entropies(samples[idx], mean[idx], logvar[idx], n_samples, generator)
            h_cond[k] += h * (len(idx) / mean.shape[0])
    mi = (h_marg[None, :] - h_cond).clamp(min=0).T.numpy()  # (D, K)
    entropy = np.log(np.array(sizes, dtype=np.float64))
    gaps = _gap(mi, entropy)
    return MIGResult(SAMPLING, float(gaps.mean()), names, gaps.tolist(), mi.tolist(), entropy.tolist(),
                     {"n": int(mean.shape[0]), "n_samples": int(n_samples)})


# -- dSprites ------------------------------------------------------------------------------------
HISTOGRAM_FACTORS = ("shape", "scale", "orientation", "posX", "posY")  # disentanglement_lib: all but color
SAMPLING_FACTORS = ("scale", "orientation", "posX", "posY")  # Chen et al.'s code


@torch.no_grad()
def encode_dsprites(model: Any, index: np.ndarray, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and log-variances (N, D) of the dSprites images ``index``, rendered on the fly."""
    from vaekit.data.dsprites import render, templates

    tmpl = templates()
    means, logvars = [], []
    was = model.training
    model.eval()
    dev = model.device
    for lo in range(0, len(index), batch_size):
        x = torch.from_numpy(render(index[lo : lo + batch_size], tmpl)).float()[:, None].to(dev)
        q = model.encode(x)
        means.append(q.mean.cpu())
        logvars.append(q.logvar.cpu())
    model.train(was)
    return torch.cat(means), torch.cat(logvars)


def dsprites_mig(model: Any, n_histogram: int = 10000, n_sampling: int | None = 100_000,
                 n_samples: int = 10000, seed: int = 0) -> dict[str, Any]:
    """Both MIG estimators of a model trained on dSprites, computed on freshly rendered images.

    ``histogram``: ``n_histogram`` uniformly drawn images (disentanglement_lib uses 10,000), factors
    shape, scale, orientation, x, y. ``sampling``: ``n_sampling`` uniformly drawn images as the
    aggregate posterior's components (None: the whole grid of 737,280 images, as Chen et al.; a
    subsample is much cheaper and is stated in the result), factors scale, orientation, x, y.
    """
    from vaekit.data.dsprites import FACTOR_NAMES, FACTOR_SIZES, NUM_IMAGES, factor_classes

    shape = model.input_shape
    if model.discrete_latent:
        raise InputError(f"dsprites_mig needs continuous codes (B, D); {type(model).__name__} has a discrete latent")
    if shape != (1, 64, 64):
        raise InputError(f"dsprites_mig needs a model of input shape (1, 64, 64), got {shape}")
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    idx = np.sort(rng.choice(NUM_IMAGES, size=n_histogram, replace=False))
    mean, _ = encode_dsprites(model, idx)
    cols = [FACTOR_NAMES.index(n) for n in HISTOGRAM_FACTORS]
    out[HISTOGRAM] = mig_histogram(mean, factor_classes(idx)[:, cols], HISTOGRAM_FACTORS).to_dict()
    idx = np.arange(NUM_IMAGES) if n_sampling is None else np.sort(rng.choice(NUM_IMAGES, n_sampling, replace=False))
    mean, logvar = encode_dsprites(model, idx)
    cols = [FACTOR_NAMES.index(n) for n in SAMPLING_FACTORS]
    res = mig_sampling(mean, logvar, factor_classes(idx)[:, cols], [FACTOR_SIZES[c] for c in cols],
                       SAMPLING_FACTORS, n_samples=n_samples, generator=g)
    res.notes["images"] = "whole grid" if n_sampling is None else f"uniform subsample of {n_sampling}"
    out[SAMPLING] = res.to_dict()
    return out
