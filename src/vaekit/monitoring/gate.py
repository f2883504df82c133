"""The data-quality gate: per-image checks run before inference.

A batch ``x`` (B, C, H, W) of floats with intensities in [0, 1] gets one verdict per image. The
checks, in the order a rejected image's ``reason`` is taken from:

``shape``       (C, H, W) differs from the model's input shape (every image of the batch);
``non_finite``  a NaN or an infinite pixel;
``range``       a pixel outside [low, high] (default [0, 1]);
``low_variance`` the image's pixel variance (population, over all C*H*W values) is below
                ``min_variance`` (the brief's rule: 0.01, in squared intensity units): blank,
                all-black, all-white and constant images;
``histogram``   the total-variation distance between the image's 32-bin intensity histogram and
                the reference histogram exceeds ``hist_threshold``.

The histogram threshold is calibrated on held-out reference images (never the training set):
``calibrate_hist_threshold`` takes their per-image distances and returns
``quantile(distances, q) * margin`` (defaults: q = 0.999, margin = 1.5). A gate sits in front of
every request, so its false rejections must be rare: the p99.9 alone would refuse ~1 in 1,000
good images by construction; the margin puts the threshold well beyond the tail of held-out
images while an image whose intensity distribution is unlike the reference (noise, inverted,
saturated) still lies far above it. The figures measured with these defaults are in
docs/monitoring.md.

A rejected image never reaches the model nor the drift statistics; the caller answers it (422
with the reason) and records the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vaekit.errors import InputError, NotFittedError, describe

HIST_BINS = 32  # the reference profile's intensity histogram: 32 equal bins over [0, 1]
# The threshold used when a reference carries a histogram but no calibrated threshold (a registry
# profile stores ``intensity_hist`` but not the held-out distances): the widest calibrated threshold
# measured (Fashion-MNIST, 0.877; docs/monitoring.md) rounded up, so an uncalibrated gate refuses only
# images whose intensity distribution is grossly unlike the reference's, never a good one of any
# dataset measured. Calibrate (QualityGate.fit) for a tighter gate.
DEFAULT_HIST_THRESHOLD = 0.9
REASONS = ("shape", "non_finite", "range", "low_variance", "histogram")


def _check_batch(x: Any, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x) or x.ndim != 4:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{name} must be a float tensor (B, C, H, W), got {got}")
    return x


def intensity_histogram(x: torch.Tensor, bins: int = HIST_BINS) -> torch.Tensor:
    """Per-image intensity histograms: x (B, C, H, W) in [0, 1] -> (B, bins) fractions of pixels.

    ``bins`` equal bins over [0, 1]; the last bin includes 1.0 (as numpy.histogram does, and as
    the reference profile's ``intensity_hist``). Values outside [0, 1] and NaN are clamped into the
    end bins; the gate rejects such images before it looks at the histogram.
    """
    x = _check_batch(x)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise InputError(f"bins must be an integer >= 2, got {describe(bins)}")
    flat = torch.nan_to_num(x.detach().flatten(1).double(), nan=0.0).clamp(0.0, 1.0)  # (B, P)
    idx = (flat * bins).long().clamp_max(bins - 1)  # 1.0 falls in the last bin
    counts = torch.zeros(x.shape[0], bins, dtype=torch.float64)
    counts.scatter_add_(1, idx, torch.ones_like(flat))
    return counts / flat.shape[1]


def reference_histogram(images: torch.Tensor, bins: int = HIST_BINS) -> torch.Tensor:
    """The pooled histogram of reference images (B, C, H, W) -> (bins,): fraction of all pixels per bin."""
    return intensity_histogram(images, bins).mean(0)


def hist_distance(hists: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Total-variation distance 0.5 * sum |h - r| of each row of ``hists`` (B, K) to ``reference`` (K,); in [0, 1]."""
    if not isinstance(hists, torch.Tensor) or hists.ndim != 2:
        raise InputError(f"hists must be a tensor (B, K), got {describe(hists)}")
    reference = _check_reference_hist(reference, hists.shape[1])
    return 0.5 * (hists.double() - reference.double()).abs().sum(1)


def _check_reference_hist(reference: Any, bins: int) -> torch.Tensor:
    ref = torch.as_tensor(np.asarray(reference, dtype=np.float64)) if not isinstance(reference, torch.Tensor) \
        else reference
    if ref.shape != (bins,) or not bool(torch.isfinite(ref).all()) or bool((ref < 0).any()) \
            or abs(float(ref.sum()) - 1.0) > 1e-6:
        raise InputError(f"reference_hist must be {bins} non-negative fractions summing to 1, "
                         f"got {describe(reference)}")
    return ref.double()


def calibrate_hist_threshold(distances: Any, quantile: float = 0.999, margin: float = 1.5) -> float:
    """The histogram threshold from held-out reference images' distances (N,): ``quantile(d, q) * margin``."""
    d = np.asarray(distances, dtype=np.float64).ravel()
    if d.size < 100 or not np.isfinite(d).all():
        raise InputError(f"distances must be >= 100 finite values from held-out images, got {d.size} values")
    if not 0.5 <= quantile < 1:
        raise InputError(f"quantile must be in [0.5, 1), got {describe(quantile)}")
    if not margin >= 1:
        raise InputError(f"margin must be >= 1, got {describe(margin)}")
    return float(np.quantile(d, quantile) * margin)


@dataclass
class Verdict:
    """One image's verdict: ``accepted``, and the first failed check's name when rejected."""

    accepted: bool
    reason: str | None = None


@dataclass
class GateResult:
    """Per-image results of :func:`check_batch` for a batch of B images.

    ``accepted`` (B,) bool; ``reasons`` B entries (None when accepted, else one of ``REASONS``);
    ``pixel_mean`` / ``pixel_var`` (B,) float64 intensity mean and population variance;
    ``hist_distance`` (B,) float64 (NaN where not computed: shape / non-finite failures or no
    reference histogram). The statistics are what a request record stores.
    """

    accepted: np.ndarray
    reasons: list[str | None]
    pixel_mean: np.ndarray
    pixel_var: np.ndarray
    hist_distance: np.ndarray

    def verdicts(self) -> list[Verdict]:
        return [Verdict(bool(a), r) for a, r in zip(self.accepted, self.reasons, strict=True)]

    def counts(self) -> dict[str, int]:
        """Rejections per reason (reasons with none are left out)."""
        out: dict[str, int] = {}
        for r in self.reasons:
            if r is not None:
                out[r] = out.get(r, 0) + 1
        return out


def check_batch(
    x: torch.Tensor,
    *,
    image_shape: tuple[int, int, int] | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    min_variance: float = 0.01,
    reference_hist: Any = None,
    hist_threshold: float | None = None,
) -> GateResult:
    """Per-image verdicts for ``x`` (B, C, H, W) (a pure function; see the module docstring).

    ``image_shape`` (C, H, W) the model expects (None: not checked); ``value_range`` the allowed
    intensities; ``min_variance`` the smallest pixel variance accepted (0 turns the check off);
    ``reference_hist`` (K,) and ``hist_threshold`` turn on the histogram check (both or neither).
    """
    x = _check_batch(x)
    low, high = _check_range(value_range)
    if isinstance(min_variance, bool) or not isinstance(min_variance, int | float) or not min_variance >= 0:
        raise InputError(f"min_variance must be a number >= 0, got {describe(min_variance)}")
    if (reference_hist is None) != (hist_threshold is None):
        raise InputError("reference_hist and hist_threshold go together: pass both or neither, got "
                         f"reference_hist={'set' if reference_hist is not None else None}, "
                         f"hist_threshold={describe(hist_threshold)}")
    if hist_threshold is not None and not (isinstance(hist_threshold, int | float) and 0 <= hist_threshold <= 1):
        raise InputError(f"hist_threshold must be a total-variation distance in [0, 1], got {describe(hist_threshold)}")
    ref = _check_reference_hist(reference_hist, len(np.asarray(reference_hist))).numpy() \
        if reference_hist is not None else None
    return _verdicts(x, image_shape, low, high, float(min_variance), ref, hist_threshold)


def _verdicts(x: torch.Tensor, image_shape: tuple[int, int, int] | None, low: float, high: float,
              min_variance: float, ref: np.ndarray | None, hist_threshold: float | None) -> GateResult:
    """check_batch on checked arguments. The per-image statistics are computed in numpy: a
    request holds a few images of a few hundred pixels, where each torch call's fixed cost
    (~3 us) is most of the work; numpy's is a third of it."""
    B = x.shape[0]
    nan = np.full(B, np.nan)
    if image_shape is not None and tuple(x.shape[1:]) != tuple(image_shape):
        return GateResult(np.zeros(B, dtype=bool), ["shape"] * B, nan.copy(), nan.copy(), nan.copy())
    t = x.detach().cpu()
    a = (t if t.dtype in (torch.float32, torch.float64) else t.double()).numpy().reshape(B, -1)  # (B, P)
    finite = np.isfinite(a).all(1)
    in_range = (a.min(1) >= low) & (a.max(1) <= high)  # NaN compares False: caught as non_finite first
    mean = a.mean(1, dtype=np.float64)
    var = a.var(1, dtype=np.float64)
    dist = np.full(B, np.nan)
    if ref is not None:
        dist = 0.5 * np.abs(_histograms(a, ref.shape[0]) - ref).sum(1)
    reasons: list[str | None] = []
    for i in range(B):
        if not finite[i]:
            reasons.append("non_finite")
        elif not in_range[i]:
            reasons.append("range")
        elif var[i] < min_variance:
            reasons.append("low_variance")
        elif hist_threshold is not None and dist[i] > hist_threshold:
            reasons.append("histogram")
        else:
            reasons.append(None)
    mean[~finite], var[~finite], dist[~finite] = np.nan, np.nan, np.nan
    return GateResult(np.array([r is None for r in reasons]), reasons, mean, var, dist)


def _histograms(a: np.ndarray, bins: int) -> np.ndarray:
    """intensity_histogram of the rows of ``a`` (B, P), in numpy: (B, bins) fractions of pixels."""
    flat = np.clip(np.nan_to_num(a.astype(np.float64), nan=0.0), 0.0, 1.0)
    idx = np.minimum((flat * bins).astype(np.int64), bins - 1)  # 1.0 falls in the last bin
    idx += np.arange(a.shape[0])[:, None] * bins
    return np.bincount(idx.ravel(), minlength=a.shape[0] * bins).reshape(a.shape[0], bins) / a.shape[1]


def _check_range(value_range: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise InputError(f"value_range must be two numbers (low, high), got {describe(value_range)}") from None
    if not low < high:
        raise InputError(f"value_range must have low < high, got {describe(value_range)}")
    return low, high


class QualityGate:
    """The gate with its histogram reference fitted from held-out images (scikit-learn style).

    ``fit(reference_images, held_out_images)`` sets ``reference_hist_`` (the pooled histogram of
    the reference images) and ``hist_threshold_`` (calibrated on the held-out images' distances to
    it; see :func:`calibrate_hist_threshold`). ``fit_from(reference_hist, hist_threshold)`` takes
    both ready-made (a stored profile). ``check(x) -> GateResult``.
    """

    def __init__(self, image_shape: tuple[int, int, int] | None = None, *, min_variance: float = 0.01,
                 value_range: tuple[float, float] = (0.0, 1.0), histogram: bool = True,
                 quantile: float = 0.999, margin: float = 1.5, bins: int = HIST_BINS):
        self.image_shape, self.min_variance, self.value_range = image_shape, min_variance, value_range
        self.histogram, self.quantile, self.margin, self.bins = histogram, quantile, margin, bins

    def fit(self, reference_images: torch.Tensor, held_out_images: torch.Tensor | None = None) -> QualityGate:
        """Reference histogram from ``reference_images`` (N, C, H, W); the threshold from the
        distances of ``held_out_images`` (disjoint from them; default: the reference images)."""
        _check_batch(reference_images, "reference_images")
        self.reference_hist_ = reference_histogram(reference_images, self.bins)
        held = reference_images if held_out_images is None else _check_batch(held_out_images, "held_out_images")
        self.held_out_distances_ = hist_distance(intensity_histogram(held, self.bins), self.reference_hist_).numpy()
        self.hist_threshold_ = calibrate_hist_threshold(self.held_out_distances_, self.quantile, self.margin)
        return self

    def fit_from(self, reference_hist: Any, hist_threshold: float) -> QualityGate:
        """Take a stored reference histogram (K,) and threshold instead of images."""
        self.reference_hist_ = _check_reference_hist(reference_hist, self.bins)
        if not isinstance(hist_threshold, int | float) or not 0 <= hist_threshold <= 1:
            raise InputError(f"hist_threshold must be in [0, 1], got {describe(hist_threshold)}")
        self.hist_threshold_ = float(hist_threshold)
        return self

    def check(self, x: torch.Tensor) -> GateResult:
        """Verdicts for a batch (B, C, H, W)."""
        if self.histogram and not hasattr(self, "hist_threshold_"):
            raise NotFittedError("QualityGate is not fitted: call fit(reference_images, held_out_images) or "
                                 "fit_from(reference_hist, hist_threshold) first, or pass histogram=False")
        if not self.histogram:
            return check_batch(x, image_shape=self.image_shape, value_range=self.value_range,
                               min_variance=self.min_variance)
        # the fitted reference was checked by fit / fit_from: the request path skips re-checking it
        ref = self.__dict__.get("_ref_np")
        if ref is None or ref[0] is not self.reference_hist_:
            ref = (self.reference_hist_, _check_reference_hist(self.reference_hist_, self.bins).numpy())
            self._ref_np = ref
        _check_batch(x)
        low, high = _check_range(self.value_range)
        return _verdicts(x, self.image_shape, low, high, float(self.min_variance), ref[1], float(self.hist_threshold_))
