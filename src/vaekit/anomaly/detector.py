"""A calibrated per-image anomaly detector in scikit-learn style, storable as plain JSON.

    det = AnomalyDetector(model, score="complexity", percentile=99).fit(held_out, source="fmnist val")
    det.predict(x)      # (N,) bool: score above threshold_
    doc = det.to_dict() # JSON-safe: the score (with its fitted statistics), threshold, what it was fit on
    det = AnomalyDetector.from_dict(doc, model)

``fit`` sets ``threshold_`` at the ``percentile`` of the scores of in-distribution reference
images, so about (100 - percentile)% of new in-distribution images are flagged. Calibrate on
held-out images (a validation split, or a test split), never on the images the model was trained
on: training images score lower than new ones, and the threshold would flag too many. A score
with fitted statistics (``mahalanobis``, ``typicality``, ``ensemble``) is fit on a seeded uniform
``fit_fraction`` of the reference and the threshold is set on the rest, so the threshold is never
set on the images the score's statistics came from. ``fitted_on_`` records all of it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaekit.anomaly.base import NotFittedError, check_images, check_labels, check_number, check_positive_int
from vaekit.anomaly.scores import as_score, score_from_dict, score_images, score_to_dict
from vaekit.atomic import atomic_write_bytes
from vaekit.errors import InputError, describe

FORMAT = "vaekit-anomaly-detector"
FORMAT_VERSION = 1


def model_fingerprint(model: Any) -> dict[str, str]:
    """{"family", "weights_sha256"}: the model a detector was fit with (sha256 over its named tensors)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {"family": getattr(model, "family", "") or type(model).__name__, "weights_sha256": h.hexdigest()}


def images_sha256(x: torch.Tensor) -> str:
    """sha256 of the images' 8-bit form (what identifies a reference set across dtypes and devices)."""
    arr = torch.round(x.detach().float().clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
    return hashlib.sha256(arr.tobytes()).hexdigest()


class AnomalyDetector:
    """Flags images whose anomaly score exceeds a threshold calibrated on in-distribution images.

    Args:
        model: the model the score runs on (kept by reference; not part of ``to_dict``).
        score: a score name (see :data:`vaekit.anomaly.SCORES`), a Score, or a score dict (kept as
            ``score_spec``, since ``score`` is the method).
        percentile: threshold percentile of the calibration scores, in (0, 100).
        score_params: parameters of a score given by name (e.g. ``{"k": 16}``).
        fit_fraction: share of the reference used to fit a score's statistics (scores that have them).
        batch_size: images per forward pass.
        seed: seed of the posterior samples and of the reference split.
    """

    def __init__(self, model: Any, score: Any = "neg_elbo", percentile: float = 99.0, *,
                 score_params: dict[str, Any] | None = None, fit_fraction: float = 0.5, batch_size: int = 256,
                 seed: int = 0):
        self.model = model
        self.score_spec = score  # stored under another name: ``score`` is the scoring method
        self.percentile = percentile
        self.score_params = score_params
        self.fit_fraction = fit_fraction
        self.batch_size = batch_size
        self.seed = seed

    # -- fitting --------------------------------------------------------------------------------
    def _check_args(self) -> None:
        check_number("percentile", self.percentile, low=0.0, high=100.0, open_low=True)
        if self.percentile >= 100:
            raise InputError(f"percentile must be in (0, 100), got {describe(self.percentile)}")
        check_number("fit_fraction", self.fit_fraction, low=0.0, high=1.0, open_low=True)
        if self.fit_fraction >= 1:
            raise InputError(f"fit_fraction must be in (0, 1), got {describe(self.fit_fraction)}")
        check_positive_int("batch_size", self.batch_size)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"seed must be an integer, got {describe(self.seed)}")
        if self.score_params is not None and not isinstance(self.score_params, dict):
            raise InputError(f"score_params must be a dict or None, got {describe(self.score_params)}")

    def fit(self, reference: Any, y: Any = None, *, source: str | None = None) -> AnomalyDetector:
        """Fit the score (if it has statistics) and set ``threshold_`` on held-out reference images.

        ``reference`` (N, C, H, W) in [0, 1]: in-distribution images the model was not trained on.
        ``source`` is a free-text note of where they came from, kept in ``fitted_on_``.
        """
        self._check_args()
        if source is not None and not isinstance(source, str):
            raise InputError(f"source must be a string or None, got {describe(source)}")
        score = as_score(self.score_spec, **(self.score_params or {}))
        score.check_model(self.model)
        reference = check_images(self.model, reference, "reference")
        n = reference.shape[0]
        y = check_labels(self.model, y, n)
        n_fit = 0
        calib, calib_y = reference, y
        if score.needs_fit:
            n_fit = int(round(self.fit_fraction * n))
            if n_fit < 4 or n - n_fit < 2:
                raise InputError(f"reference must hold enough images to fit score {score.name!r} on "
                                 f"{self.fit_fraction:g} of them and calibrate on the rest, got {n}")
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
            fit_idx, cal_idx = perm[:n_fit], perm[n_fit:]
            score.fit(self.model, reference[fit_idx], y[fit_idx] if y is not None else None,
                      batch_size=self.batch_size, seed=self.seed)
            calib = reference[cal_idx]
            calib_y = y[cal_idx] if y is not None else None
        elif n < 2:
            raise InputError(f"reference must hold at least 2 images, got {n}")
        s = score_images(self.model, calib, score, calib_y, batch_size=self.batch_size, seed=self.seed).numpy()
        if not np.isfinite(s).all():
            raise InputError(f"score {score.name!r} is not finite on {int((~np.isfinite(s)).sum())} reference images")
        self.score_ = score
        self.threshold_ = float(np.percentile(s, self.percentile))
        qs = (1, 5, 50, 95, 99)
        self.calibration_ = {"n": int(s.size), "mean": float(s.mean()), "std": float(s.std(ddof=1)),
                             "min": float(s.min()), "max": float(s.max()),
                             "quantiles": {str(q): float(np.percentile(s, q)) for q in qs},
                             "flagged_share": float(np.mean(s > self.threshold_))}
        self.fitted_on_ = {"source": source or "unspecified", "n_reference": n, "n_score_fit": n_fit,
                           "n_calibration": int(s.size), "reference_sha256": images_sha256(reference),
                           "seed": self.seed}
        self.model_ = model_fingerprint(self.model)
        return self

    # -- use ------------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "threshold_"):
            raise NotFittedError("this AnomalyDetector is not fitted yet: call fit(reference) with held-out "
                                 "in-distribution images first (or load one with AnomalyDetector.from_dict)")

    def score_samples(self, x: Any, y: Any = None) -> torch.Tensor:
        """(N,) float64 scores of x (N, C, H, W); larger = more anomalous."""
        self._check_fitted()
        return score_images(self.model, x, self.score_, y, batch_size=self.batch_size, seed=self.seed)

    def score(self, x: Any, y: Any = None) -> torch.Tensor:
        """Alias of :meth:`score_samples`."""
        return self.score_samples(x, y)

    def predict(self, x: Any, y: Any = None) -> torch.Tensor:
        """(N,) bool: True where the score exceeds ``threshold_`` (an anomaly)."""
        return self.score_samples(x, y) > self.threshold_

    # -- storage --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-safe dict: the score with its fitted statistics, threshold, calibration summary,
        what it was fit on and the model's fingerprint (a reference profile can embed it as is)."""
        self._check_fitted()
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "score": score_to_dict(self.score_),
               "percentile": float(self.percentile), "threshold": self.threshold_, "higher_is_anomalous": True,
               "fit_fraction": float(self.fit_fraction), "batch_size": self.batch_size, "seed": self.seed,
               "calibration": self.calibration_, "fitted_on": self.fitted_on_, "model": self.model_}
        json.dumps(doc, allow_nan=False)  # proves JSON safety: raises on NaN or a non-plain value
        return doc

    @classmethod
    def from_dict(cls, data: Any, model: Any, *, check_model: bool = True) -> AnomalyDetector:
        """Rebuild a fitted detector for ``model``; InputError if ``check_model`` and the model's weights
        differ from those it was fit with (the threshold belongs to those weights)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(f"data must be a dict written by AnomalyDetector.to_dict (format {FORMAT!r}), "
                             f"got {describe(data)}")
        if data.get("format_version") != FORMAT_VERSION:
            raise InputError(f"detector format_version must be {FORMAT_VERSION}, got "
                             f"{describe(data.get('format_version'))}")
        try:
            score = score_from_dict(data["score"])
            det = cls(model, score=score, percentile=data["percentile"], fit_fraction=data["fit_fraction"],
                      batch_size=data["batch_size"], seed=data["seed"])
            threshold = float(data["threshold"])
            calibration, fitted_on, fingerprint = dict(data["calibration"]), dict(data["fitted_on"]), \
                dict(data["model"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"detector dict is missing or has a bad field: {exc}") from exc
        det._check_args()
        if not math.isfinite(threshold):
            raise InputError(f"detector threshold must be finite, got {threshold}")
        if not score.fitted:
            raise InputError(f"detector dict holds score {score.name!r} without its fitted state")
        if check_model:
            now = model_fingerprint(model)
            if now != fingerprint:
                raise InputError(f"the detector was fit with model {fingerprint} but got {now}; refit it, or pass "
                                 f"check_model=False to use the threshold anyway")
        score.check_model(model)
        det.score_, det.threshold_ = score, threshold
        det.calibration_, det.fitted_on_, det.model_ = calibration, fitted_on, fingerprint
        return det

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as a JSON file, atomically."""
        path = Path(path)
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any, *, check_model: bool = True) -> AnomalyDetector:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"could not read a detector from {path}: {exc}") from exc
        return cls.from_dict(data, model, check_model=check_model)

    def __repr__(self) -> str:
        state = f"threshold_={self.threshold_:.6g}" if hasattr(self, "threshold_") else "unfitted"
        return f"AnomalyDetector(score={self.score_spec!r}, percentile={self.percentile!r}, {state})"
