"""Maximum mean discrepancy (Gretton et al. 2012) with Gaussian (RBF) kernels.

MMD^2(P, Q) = E k(x, x') + E k(y, y') - 2 E k(x, y) for x, x' ~ P, y, y' ~ Q. The unbiased
estimator drops the i = j terms of the within-sample sums, so it is 0 in expectation when P = Q
(and can then come out slightly negative). The kernel is a sum of RBF kernels
k(a, b) = sum_s exp(-||a - b||^2 / (2 s^2)) over bandwidths s, which keeps the test sensitive at
several length scales.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vaekit.errors import InputError


def _check(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] < 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{name} must be a tensor (N >= 2, D), got {got}")


def median_bandwidth(x: torch.Tensor, y: torch.Tensor) -> float:
    """The median pairwise distance of the pooled samples (the usual kernel width heuristic)."""
    _check(x, "x")
    _check(y, "y")
    pooled = torch.cat([x, y]).double()
    d = torch.cdist(pooled, pooled)
    return float(d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)].median())


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] | None = None) -> float:
    """Unbiased MMD^2 between samples x (N, D) and y (M, D) with a sum of RBF kernels.

    ``bandwidths``: kernel widths s; default: the median heuristic times (0.5, 1, 2).
    """
    _check(x, "x")
    _check(y, "y")
    if x.shape[1] != y.shape[1]:
        raise InputError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    if bandwidths is None:
        m = median_bandwidth(x, y)
        bandwidths = (0.5 * m, m, 2.0 * m)
    if len(bandwidths) == 0 or not all(s > 0 for s in bandwidths):
        raise InputError(f"bandwidths must be positive numbers, got {list(bandwidths)!r}")
    x, y = x.double(), y.double()

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2.0 * s * s)) for s in bandwidths)

    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(xx + yy - 2.0 * kxy.mean())
