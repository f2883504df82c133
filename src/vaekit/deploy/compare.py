"""Comparing the latent codes two versions give the same requests (production vs shadow).

Two trained VAEs' latent spaces are not aligned (any rotation or permutation of z is an equally
good model), so the codes are compared with measures that ignore that freedom:

* linear CKA (Kornblith et al. 2019): ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred codes;
  1 when one code is an orthogonal transform and scaling of the other, near 0 when unrelated;
  invariant to rotation and isotropic scaling, and defined when the dimensions differ;
* the Procrustes disparity (``scipy.spatial.procrustes``): after centring, scaling to unit
  Frobenius norm and the best rotation, the remaining sum of squared differences, in [0, 1]
  (0: identical up to rotation and scale). Codes of different widths are zero-padded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.spatial import procrustes

from vaekit.errors import InputError


def _codes(name: str, a: Any) -> np.ndarray:
    x = np.asarray(a, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3:
        raise InputError(f"{name} must be (N, D) latent codes with N >= 3, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InputError(f"{name} holds NaN or inf values")
    return x


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA of codes x (N, D1) and y (N, D2) of the same N inputs, in [0, 1]."""
    x, y = _codes("x", x), _codes("y", y)
    if x.shape[0] != y.shape[0]:
        raise InputError(f"x and y must hold codes of the same inputs, got {x.shape[0]} and {y.shape[0]} rows")
    x = x - x.mean(0)
    y = y - y.mean(0)
    den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    if den == 0:
        raise InputError("CKA is undefined for a constant code (zero variance in x or y)")
    return float(np.linalg.norm(y.T @ x) ** 2 / den)


def procrustes_disparity(x: Any, y: Any) -> float:
    """Sum of squared differences after the best rotation and scaling, in [0, 1] (scipy's procrustes)."""
    x, y = _codes("x", x), _codes("y", y)
    if x.shape[0] != y.shape[0]:
        raise InputError(f"x and y must hold codes of the same inputs, got {x.shape[0]} and {y.shape[0]} rows")
    d = max(x.shape[1], y.shape[1])
    pad = lambda a: np.pad(a, ((0, 0), (0, d - a.shape[1])))  # noqa: E731
    return float(procrustes(pad(x), pad(y))[2])


def compare_latents(production: Any, shadow: Any) -> dict[str, float]:
    """CKA and Procrustes disparity of two versions' codes for the same N requests (N, D1), (N, D2)."""
    p, s = _codes("production", production), _codes("shadow", shadow)
    return {"linear_cka": linear_cka(p, s), "procrustes_disparity": procrustes_disparity(p, s), "n": int(p.shape[0])}
