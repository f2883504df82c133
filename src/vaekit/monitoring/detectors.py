"""Drift detectors that read the VAE's own posterior and errors, in scikit-learn style.

``__init__`` stores its arguments (validated in ``fit``), ``fit(reference) -> self`` sets the
learned attributes (their names end in ``_``), ``score(window) -> DetectorResult``; a detector used
before ``fit`` raises NotFittedError. ``reference`` and ``window`` are
:class:`~vaekit.monitoring.reference.Reference` / :class:`~vaekit.monitoring.reference.Window`.

Every test below controls its false-alarm rate at ``alpha`` (default 0.01, the brief's p < 0.01)
when the window and the reference are drawn from the same distribution, except the two fixed
rules the brief states (``MomentsDetector(rule="fixed")`` and ``ExceedanceDetector(test="fixed")``),
whose false-alarm rates are reported in ``details`` or measured in bench/drift.py. "Controls"
means on average over the draw of the reference (the tests are exact or conservative for
exchangeable reference and window images); :class:`ExceedanceDetector` also bounds it for the
one reference at hand, with 99 % confidence:

* :class:`KSDetector`: a two-sample Kolmogorov-Smirnov test per latent dimension on posterior
  means (scipy.stats.ks_2samp), Bonferroni (default) or Benjamini-Hochberg across dimensions.
* :class:`MomentsDetector`: the aggregated posterior q(z) = mean over x of q(z|x), per dimension
  mean and variance (var = E_x[sigma^2(x)] + Var_x[mu(x)]): the brief's fixed rule vs the prior
  (|mean| > 0.1 or var < 0.8 in any dimension), or a calibrated test vs the reference.
* :class:`MMDDetector`: unbiased MMD^2 (vaekit.objectives.mmd) between reference and window
  posterior means, p-value from a permutation test with the kernel fixed at fit time.
* :class:`ExceedanceDetector`: the share of a window above a reference threshold: recon error
  above the reference p99 in more than 1 % of the window (:func:`recon_error_detector`), latent
  norms above 5 in more than 0.1 % (:func:`latent_norm_detector`); by default a binomial test
  against a 99 % upper bound of the reference's exceedance rate.
* :class:`RollingMeanDetector`: the mean over the last ``period_s`` (5 minutes) of recon error,
  KL and latent norm, each against the reference mean with a 3-sigma rule.
* :class:`InputStatsDetector`: KS tests on per-image pixel mean and variance (data drift).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np
import torch
from scipy import stats

from vaekit.errors import ConfigError, InputError, NotFittedError, check_choice, describe
from vaekit.monitoring.reference import Reference, Window
from vaekit.objectives.mmd import median_bandwidth


@dataclass
class DetectorResult:
    """One detector's verdict on one window.

    ``statistic``: the test statistic (its meaning is per detector, in ``details["statistic"]``);
    ``threshold``: the value the statistic is compared with (fixed rules, 3-sigma) or the level
    ``alpha`` the p-value is compared with; ``p_value``: None for rules without one;
    ``drifted``: the alarm; ``n``: images in the window; ``details``: per-dimension figures.
    """

    detector: str
    statistic: float
    drifted: bool
    threshold: float | None = None
    p_value: float | None = None
    n: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"detector": self.detector, "statistic": self.statistic, "drifted": self.drifted,
                "threshold": self.threshold, "p_value": self.p_value, "n": self.n, "details": self.details}


def _check_alpha(alpha: Any) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
        raise ConfigError(f"alpha must be a number in (0, 1), got {describe(alpha)}")


def _check_confidence(confidence: Any) -> None:
    if confidence is not None and (isinstance(confidence, bool) or not isinstance(confidence, float)
                                   or not 0.5 <= confidence < 1):
        raise ConfigError(f"confidence must be None or a number in [0.5, 1), got {describe(confidence)}")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {describe(value)}")


class Detector:
    """Base class: ``fit(reference) -> self``, ``score(window) -> DetectorResult``."""

    name = "detector"
    _fitted: tuple[str, ...] = ()  # attributes set by fit; score checks they exist

    def fit(self, reference: Reference) -> Self:
        raise NotImplementedError

    def score(self, window: Window) -> DetectorResult:
        raise NotImplementedError

    def is_fitted(self) -> bool:
        return all(hasattr(self, a) for a in self._fitted)

    def _check_fitted(self) -> None:
        if not self.is_fitted():
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit(reference) before score(window)")

    def _check_window(self, window: Any, min_n: int = 2) -> Window:
        if not isinstance(window, Window):
            raise InputError(f"window must be a vaekit.monitoring.Window, got {type(window).__name__}")
        if len(window) < min_n:
            raise InputError(f"window must hold at least {min_n} images for {type(self).__name__}, got {len(window)}")
        return window

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.endswith("_") and not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _reference(reference: Any) -> Reference:
    if not isinstance(reference, Reference):
        raise InputError(f"reference must be a vaekit.monitoring.Reference, got {type(reference).__name__}")
    return reference


def _matrix(obj: Any, fields: tuple[str, ...], who: str) -> np.ndarray:
    """The named fields of a Reference / Window as columns: (N, D) for 'latent', (N, 1) per 1-D field."""
    cols = [obj.require(f, who) for f in fields]
    return np.column_stack([c if c.ndim == 2 else c[:, None] for c in cols])


def adjust_pvalues(p: np.ndarray, correction: str) -> np.ndarray:
    """Multiple-testing adjusted p-values: Bonferroni min(1, m p) or Benjamini-Hochberg (scipy)."""
    p = np.asarray(p, dtype=np.float64)
    if correction == "bonferroni":
        return np.minimum(1.0, p * p.size)
    if correction == "bh":
        return stats.false_discovery_control(p, method="bh")
    raise ConfigError(f"correction must be 'bonferroni' or 'bh', got {describe(correction)}")


class KSDetector(Detector):
    """Two-sample KS test per feature (default: each latent dimension of the posterior mean).

    The window drifts when any adjusted p-value is below ``alpha``: Bonferroni (family-wise
    error <= alpha) or Benjamini-Hochberg (false discovery rate <= alpha; with no drift at all
    this also bounds the false-alarm rate by alpha). ``p_value`` is the smallest adjusted p-value.

    ``confidence=None`` (default): the plain two-sample test (``scipy.stats.ks_2samp``), whose
    false-alarm rate is <= alpha on average over the draw of the reference. One reference is a
    fixed offset in every window, so its own rate lands above or below alpha (bench/drift.py:
    0.25 % to 2.0 % over 10 MNIST references of 2,000 rows at alpha 0.01, 0.80 % on average;
    docs/monitoring.md).

    ``confidence`` in [0.5, 1): a guarantee for the reference at hand. By the DKW inequality
    (Massart's constant) and a union bound over the F features, with probability >= confidence
    over the reference draw every feature's reference CDF is within
    ``margin_ = sqrt(log(2 F / (1 - confidence)) / (2 n))`` of its population CDF; on that event
    D - margin_ <= sup |F_window - F|, so ``p = kstwo.sf(max(D - margin_, 0), m)`` (the exact
    one-sample Kolmogorov law of an m-row window) is a valid p-value and the false-alarm rate is
    <= alpha exactly (finite samples, any continuous distribution). The price is power: the
    offset of an n-row ECDF shrinks only as 1/sqrt(n) (MMD's as 1/n), so with n = 2,000 and
    m = 500 the margin raises the per-dimension threshold by about a third, and the brief's case
    (15 % new class) is no longer caught within 1,000 requests (docs/monitoring.md). Worth it with
    a reference of 10,000 or more rows, or where a false alarm costs more than a late one.
    """

    name = "ks_latent"
    _fitted = ("reference_", "n_features_", "margin_")

    def __init__(self, alpha: float = 0.01, correction: str = "bonferroni", fields: tuple[str, ...] = ("latent",),
                 name: str | None = None, confidence: float | None = None):
        self.alpha, self.correction, self.fields, self.confidence = alpha, correction, fields, confidence
        if name is not None:
            self.name = name

    def fit(self, reference: Reference) -> Self:
        _check_alpha(self.alpha)
        check_choice("correction", self.correction, ("bonferroni", "bh"))
        _check_confidence(self.confidence)
        self.reference_ = _matrix(_reference(reference), tuple(self.fields), type(self).__name__)
        if self.reference_.shape[0] < 2:
            raise InputError(f"the reference must hold at least 2 images, got {self.reference_.shape[0]}")
        n, self.n_features_ = self.reference_.shape
        self.margin_ = (0.0 if self.confidence is None
                        else math.sqrt(math.log(2 * self.n_features_ / (1 - self.confidence)) / (2 * n)))
        return self

    def score(self, window: Window) -> DetectorResult:
        self._check_fitted()
        w = _matrix(self._check_window(window), tuple(self.fields), type(self).__name__)
        if w.shape[1] != self.n_features_:
            raise InputError(f"window has {w.shape[1]} features ({self.fields}), the reference {self.n_features_}")
        res = stats.ks_2samp(self.reference_, w, axis=0)
        d = np.atleast_1d(res.statistic)
        p_plain = np.atleast_1d(res.pvalue)
        p = p_plain if self.confidence is None else stats.kstwo.sf(np.maximum(d - self.margin_, 0.0), w.shape[0])
        adj = adjust_pvalues(p, self.correction)
        flagged = np.flatnonzero(adj < self.alpha)
        details = {"statistic": "max KS distance over features", "p_values": p.tolist(), "adjusted": adj.tolist(),
                   "flagged": flagged.tolist(), "correction": self.correction}
        if self.confidence is not None:
            details.update(margin=self.margin_, confidence=self.confidence, p_values_without_margin=p_plain.tolist())
        return DetectorResult(self.name, float(np.max(d)), bool(flagged.size), self.alpha, float(adj.min()),
                              w.shape[0], details)


class InputStatsDetector(KSDetector):
    """Data drift on the inputs themselves: KS tests on per-image pixel mean and variance."""

    name = "input_stats"

    def __init__(self, alpha: float = 0.01, correction: str = "bonferroni",
                 fields: tuple[str, ...] = ("pixel_mean", "pixel_var"), name: str | None = None,
                 confidence: float | None = None):
        super().__init__(alpha, correction, fields, name, confidence)


def aggregated_moments(latent: np.ndarray, logvar: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance (D,) of the aggregated posterior q(z) = (1/N) sum_x N(mu(x), sigma^2(x)).

    var = E_x[sigma^2(x)] + Var_x[mu(x)] (law of total variance, population variance); without
    ``logvar`` (point codes) only the second term.
    """
    mean = latent.mean(0)
    var = latent.var(0)
    if logvar is not None:
        var = var + np.exp(logvar).mean(0)
    return mean, var


class MomentsDetector(Detector):
    """Aggregated-posterior moments per latent dimension.

    ``rule="fixed"`` (the brief's): drift when any dimension has |mean| > ``max_abs_mean`` (0.1)
    or variance < ``min_var`` (0.8), i.e. q(z) moved away from the prior N(0, I). The statistic is
    max over dimensions of max(|mean| / max_abs_mean, min_var / var): above 1 means drift. Its
    false-alarm rate is not controlled (a trained VAE's q(z) need not match the prior that well):
    bench/drift.py measures it.

    ``rule="calibrated"``: vs the reference's own moments. Per dimension the differences of mean
    and log-variance, each divided by its spread under no drift; the statistic is the largest of
    the 2D standardized differences, its null distribution is that of ``n_splits`` random splits of
    the reference into a pseudo-window of the window's size and the rest (computed once per window
    size), and ``p_value`` = (1 + #null >= statistic) / (1 + n_splits). When the reference and the
    window both carry ``logvar`` the variance is q(z)'s, else that of the posterior means.
    """

    name = "moments"
    _fitted = ("latent_", "logvar_", "mean_", "var_")

    def __init__(self, rule: str = "calibrated", alpha: float = 0.01, max_abs_mean: float = 0.1, min_var: float = 0.8,
                 n_splits: int = 1000, seed: int = 0, name: str | None = None):
        self.rule, self.alpha, self.max_abs_mean, self.min_var = rule, alpha, max_abs_mean, min_var
        self.n_splits, self.seed = n_splits, seed
        if name is not None:
            self.name = name

    def fit(self, reference: Reference | None = None) -> Self:
        """``rule="fixed"`` compares with the prior and needs no reference (None is allowed)."""
        check_choice("rule", self.rule, ("fixed", "calibrated"))
        _check_alpha(self.alpha)
        _check_int("n_splits", self.n_splits, 100)
        if self.rule == "fixed" and reference is None:
            self.latent_ = self.logvar_ = self.mean_ = self.var_ = None
            self.null_ = {}
            return self
        ref = _reference(reference)
        self.latent_ = ref.require("latent", type(self).__name__)
        self.logvar_ = ref.logvar
        self.mean_, self.var_ = aggregated_moments(self.latent_, self.logvar_)
        self.null_: dict[tuple[int, bool], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        return self

    def score(self, window: Window) -> DetectorResult:
        self._check_fitted()
        window = self._check_window(window)
        mu = window.require("latent", type(self).__name__)
        if self.rule == "fixed":
            mean, var = aggregated_moments(mu, window.logvar)
            ratio = np.maximum(np.abs(mean) / self.max_abs_mean, self.min_var / np.maximum(var, 1e-300))
            return DetectorResult(self.name, float(ratio.max()), bool((ratio > 1).any()), 1.0, None, len(window),
                                  {"statistic": "max over dims of max(|mean|/max_abs_mean, min_var/var)",
                                   "mean": mean.tolist(), "var": var.tolist(), "rule": "fixed",
                                   "flagged": np.flatnonzero(ratio > 1).tolist(),
                                   "variance": "q(z)" if window.logvar is not None else "posterior means"})
        if self.latent_ is None:
            raise NotFittedError("MomentsDetector(rule='calibrated') needs a reference: call fit(reference)")
        if mu.shape[1] != self.latent_.shape[1]:
            raise InputError(f"window latent has {mu.shape[1]} dims, the reference {self.latent_.shape[1]}")
        use_var = self.logvar_ is not None and window.logvar is not None
        ref_mean, ref_var = aggregated_moments(self.latent_, self.logvar_ if use_var else None)
        mean, var = aggregated_moments(mu, window.logvar if use_var else None)
        scale_m, scale_v, null = self._null(len(window), use_var)
        z = np.concatenate([np.abs(mean - ref_mean) / scale_m, np.abs(np.log(var) - np.log(ref_var)) / scale_v])
        t = float(z.max())
        p = float((1 + (null >= t).sum()) / (1 + null.size))
        return DetectorResult(self.name, t, p < self.alpha, self.alpha, p, len(window),
                              {"statistic": "max standardized |diff| of per-dim mean and log-variance",
                               "rule": "calibrated", "mean": mean.tolist(), "var": var.tolist(),
                               "ref_mean": ref_mean.tolist(), "ref_var": ref_var.tolist(),
                               "variance": "q(z)" if use_var else "posterior means",
                               "null_p99": float(np.quantile(null, 0.99))})

    def _null(self, n: int, use_var: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-dim spreads and the null statistics for windows of ``n`` images (cached per n)."""
        key = (n, use_var)
        if key in self.null_:
            return self.null_[key]
        N = self.latent_.shape[0]
        rng = np.random.default_rng([self.seed, n])
        lv = self.logvar_ if use_var else None
        dm, dv = [], []
        for _ in range(self.n_splits):
            if n <= N // 2:  # a split: pseudo-window and pseudo-reference disjoint, as real ones are
                perm = rng.permutation(N)
                w_idx, r_idx = perm[:n], perm[n:]
            else:  # a window larger than half the reference: bootstrap it against the whole reference
                w_idx, r_idx = rng.integers(0, N, n), np.arange(N)
            wm, wv = aggregated_moments(self.latent_[w_idx], None if lv is None else lv[w_idx])
            rm, rv = aggregated_moments(self.latent_[r_idx], None if lv is None else lv[r_idx])
            dm.append(np.abs(wm - rm))
            dv.append(np.abs(np.log(wv) - np.log(rv)))
        dm_a, dv_a = np.array(dm), np.array(dv)  # (S, D)
        # the RMS of |diff| under no drift, per dim (its null standard deviation, the means being ~0)
        scale_m = np.sqrt((dm_a**2).mean(0)) + 1e-12
        scale_v = np.sqrt((dv_a**2).mean(0)) + 1e-12
        null = np.concatenate([dm_a / scale_m, dv_a / scale_v], axis=1).max(1)  # (S,)
        self.null_[key] = (scale_m, scale_v, null)
        return self.null_[key]


class MMDDetector(Detector):
    """MMD^2 between reference and window posterior means with a permutation test, made valid for the
    one reference at hand.

    ``fit`` keeps ``n_reference`` reference rows (all of them when the reference is smaller; a
    seeded draw otherwise), fixes the RBF bandwidths at (0.5, 1, 2) x the median pairwise distance
    of those rows (a kernel chosen from the window would break the permutation test's exactness)
    and computes their (n, n) kernel matrix once. ``score``: the unbiased MMD^2 T of
    vaekit.objectives.mmd.mmd_rbf and ``n_permutations`` random relabellings of the pooled sample.

    Why a margin. The permutation p-value (1 + #perm >= T) / (1 + n_permutations) is exact on
    average over reference draws, but a deployment has one reference, and its own sampling noise
    is a fixed offset in every window's T: write T = A + B - 2C with the kernel centred at the
    population (Hoeffding), A the reference-only term, B the window-only one, C the cross term
    (mean 0 given the reference). A has mean 0 and variance 2 E[k~(x, y)^2] / (n (n - 1)); given the
    reference it is a constant, and a reference with A > 0 alarms on more than alpha of its
    windows (bench/drift.py, 500 reference rows: 0 % to 2-3 % of 400 Fashion-MNIST windows by
    draw; docs/monitoring.md). ``confidence=0.99`` (default) compares T - z * sd(A) with the
    permutations (z the standard normal ``confidence`` quantile, sd(A) estimated from the
    doubly centred reference kernel matrix): the false-alarm rate stays <= alpha for every
    reference whose A is below z sd(A), that is with probability about ``confidence`` over the
    reference draw (A is a centred sum of many weighted chi-squares: near normal), the tolerance
    guarantee of :class:`ExceedanceDetector`. ``confidence=None``: the plain permutation test.
    ``n_reference`` defaults to 2,000 (a default profile's whole sample): sd(A) shrinks as 1 / n,
    so the margin costs less power with more reference rows.
    """

    name = "mmd_latent"
    _fitted = ("reference_", "bandwidths_", "reference_kernel_", "offset_sd_")

    def __init__(self, alpha: float = 0.01, n_permutations: int = 200, n_reference: int = 2000,
                 bandwidths: tuple[float, ...] | None = None, seed: int = 0, confidence: float | None = 0.99,
                 name: str | None = None):
        self.alpha, self.n_permutations, self.n_reference = alpha, n_permutations, n_reference
        self.bandwidths, self.seed, self.confidence = bandwidths, seed, confidence
        if name is not None:
            self.name = name

    def fit(self, reference: Reference) -> Self:
        _check_alpha(self.alpha)
        _check_int("n_permutations", self.n_permutations, 1)
        if self.n_permutations < math.ceil(1 / self.alpha):
            raise ConfigError(f"n_permutations must be >= 1/alpha = {math.ceil(1 / self.alpha)} for the test to ever "
                              f"reach p < alpha, got {self.n_permutations}")
        _check_int("n_reference", self.n_reference, 4)
        _check_confidence(self.confidence)
        lat = _reference(reference).require("latent", type(self).__name__)
        if lat.shape[0] <= self.n_reference:
            self.reference_ = torch.from_numpy(lat).double()
        else:
            pick = np.random.default_rng(self.seed).choice(lat.shape[0], size=self.n_reference, replace=False)
            self.reference_ = torch.from_numpy(lat[np.sort(pick)]).double()
        if self.bandwidths is None:
            half = self.reference_.shape[0] // 2
            m = median_bandwidth(self.reference_[:half], self.reference_[half:])
            self.bandwidths_ = (0.5 * m, m, 2.0 * m)
        else:
            if len(self.bandwidths) == 0 or not all(isinstance(s, int | float) and s > 0 for s in self.bandwidths):
                raise ConfigError(f"bandwidths must be positive numbers, got {describe(self.bandwidths)}")
            self.bandwidths_ = tuple(float(s) for s in self.bandwidths)
        self.reference_kernel_ = rbf_kernel(self.reference_, self.reference_, self.bandwidths_)  # (n, n)
        self.offset_sd_ = reference_offset_sd(self.reference_kernel_)
        self.margin_ = 0.0 if self.confidence is None else float(stats.norm.ppf(self.confidence)) * self.offset_sd_
        self._rng = np.random.default_rng([self.seed, 1])
        return self

    def score(self, window: Window) -> DetectorResult:
        self._check_fitted()
        w = torch.from_numpy(self._check_window(window).require("latent", type(self).__name__)).double()
        if w.shape[1] != self.reference_.shape[1]:
            raise InputError(f"window latent has {w.shape[1]} dims, the reference {self.reference_.shape[1]}")
        n, m, diag = self.reference_.shape[0], w.shape[0], float(len(self.bandwidths_))
        blocks = (self.reference_kernel_, rbf_kernel(self.reference_, w, self.bandwidths_),
                  rbf_kernel(w, w, self.bandwidths_))
        identity = torch.zeros(1, n + m, dtype=torch.float64)
        identity[0, :n] = 1.0
        observed = float(mmd_from_blocks(*blocks, identity, diag)[0])
        null = mmd_from_blocks(*blocks, random_labellings(n, m, self.n_permutations, self._rng), diag).numpy()
        p = float((1 + (null >= observed - self.margin_).sum()) / (1 + self.n_permutations))
        p_plain = float((1 + (null >= observed).sum()) / (1 + self.n_permutations))
        return DetectorResult(self.name, observed, p < self.alpha, self.alpha, p, m,
                              {"statistic": "unbiased MMD^2, RBF kernels", "bandwidths": list(self.bandwidths_),
                               "null_p99": float(np.quantile(null, 0.99)), "n_permutations": self.n_permutations,
                               "n_reference": n, "margin": self.margin_, "offset_sd": self.offset_sd_,
                               "p_value_without_margin": p_plain})


def reference_offset_sd(k_xx: torch.Tensor) -> float:
    """Estimated standard deviation of the reference-only term A of the unbiased MMD^2 (MMDDetector):
    sqrt(2 E[k~(x, y)^2] / (n (n - 1))), E[k~^2] the mean squared off-diagonal entry of the doubly
    centred kernel matrix H K H (H = I - 11^T / n) of the n reference rows. k_xx (n, n) float64."""
    n = k_xx.shape[0]
    centred = k_xx - k_xx.mean(0, keepdim=True) - k_xx.mean(1, keepdim=True) + k_xx.mean()
    off = (centred.pow(2).sum() - centred.diagonal().pow(2).sum()) / (n * (n - 1))
    return float(torch.sqrt(2.0 * off / (n * (n - 1))))


def rbf_kernel(a: torch.Tensor, b: torch.Tensor, bandwidths: tuple[float, ...]) -> torch.Tensor:
    """sum_s exp(-||a_i - b_j||^2 / (2 s^2)): (N, D), (M, D) -> (N, M) float64 (objectives.mmd's kernel)."""
    d2 = torch.cdist(a.double(), b.double()).pow(2)
    return sum(torch.exp(-d2 / (2.0 * s * s)) for s in bandwidths)


def pooled_kernel(k_xx: torch.Tensor, x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...]) -> torch.Tensor:
    """The kernel matrix of the pooled sample [x; y] (N + M, N + M) from x's own (N, N), computed once.

    Only the (N, M) and (M, M) blocks are new per window: with N = 2,000 reference rows and M = 500
    that is a fifth of the entries of the whole matrix."""
    k_xy = rbf_kernel(x, y, bandwidths)  # (N, M)
    k_yy = rbf_kernel(y, y, bandwidths)  # (M, M)
    return torch.cat([torch.cat([k_xx, k_xy], 1), torch.cat([k_xy.T, k_yy], 1)], 0)


def random_labellings(n: int, m: int, n_permutations: int, rng: np.random.Generator) -> torch.Tensor:
    """(P, n + m) 0/1 rows, each with n ones at uniformly random places: random relabellings of the pooled
    sample into n rows called x and m called y."""
    base = np.concatenate([np.ones(n), np.zeros(m)])
    return torch.from_numpy(rng.permuted(np.tile(base, (n_permutations, 1)), axis=1))


def permutation_mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...], n_permutations: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Unbiased MMD^2 of ``n_permutations`` random relabellings of the pooled sample (x: N rows, y: M).

    The pooled kernel matrix K is computed once; a relabelling is a 0/1 indicator w of the rows
    called x, and sum_{i,j in x} K_ij = w^T K w, so all permutations are one matrix product. The
    kernel's diagonal is constant (k(a, a) = number of bandwidths), which makes dropping the
    i = j terms a constant.
    """
    n, m = x.shape[0], y.shape[0]
    K = pooled_kernel(rbf_kernel(x, x, bandwidths), x, y, bandwidths)  # (n + m, n + m)
    return mmd_from_kernel(K, random_labellings(n, m, n_permutations, rng), float(len(bandwidths))).numpy()


def mmd_from_blocks(k_xx: torch.Tensor, k_xy: torch.Tensor, k_yy: torch.Tensor, wx: torch.Tensor,
                    diag: float) -> torch.Tensor:
    """:func:`mmd_from_kernel` of the pooled matrix [[k_xx, k_xy], [k_xy^T, k_yy]] (N + M rows) without
    building it: k_xx (N, N) is the reference's, computed once; wx (P, N + M) 0/1 rows -> (P,)."""
    n = k_xx.shape[0]
    a, b = wx[:, :n], wx[:, n:]  # (P, N), (P, M)
    on_x = a @ k_xx + b @ k_xy.T  # (P, N): row sums of K over the rows labelled x, columns of x's part
    on_y = a @ k_xy + b @ k_yy  # (P, M)
    sxx = (on_x * a).sum(1) + (on_y * b).sum(1)
    row = torch.cat([k_xx.sum(1) + k_xy.sum(1), k_xy.sum(0) + k_yy.sum(1)])  # (N + M,) row sums of K
    sxy = wx @ row - sxx
    syy = (k_xx.sum() + 2.0 * k_xy.sum() + k_yy.sum()) - sxx - 2.0 * sxy
    nx = wx.sum(1)
    ny = wx.shape[1] - nx
    return (sxx - nx * diag) / (nx * (nx - 1)) + (syy - ny * diag) / (ny * (ny - 1)) - 2.0 * sxy / (nx * ny)


def mmd_from_kernel(K: torch.Tensor, wx: torch.Tensor, diag: float) -> torch.Tensor:
    """Unbiased MMD^2 for each labelling: K (T, T) pooled kernel, wx (P, T) 0/1 rows (1: in x) -> (P,).

    ``diag`` is the kernel's constant diagonal k(a, a). One product wx K (P, T) gives all three
    sums: s_xx = w^T K w, s_x. = w^T K 1 (so s_xy = s_x. - s_xx), and s_yy = 1^T K 1 - s_xx - 2 s_xy."""
    n = wx.sum(1)  # (P,)
    m = K.shape[0] - n
    Kwx = wx @ K  # (P, T)
    sxx = (Kwx * wx).sum(1)
    sxy = Kwx.sum(1) - sxx
    syy = K.sum() - sxx - 2.0 * sxy
    xx = (sxx - n * diag) / (n * (n - 1))
    yy = (syy - m * diag) / (m * (m - 1))
    return xx + yy - 2.0 * sxy / (n * m)


class ExceedanceDetector(Detector):
    """The share of a window above a threshold set on the reference.

    ``threshold`` (a number) or ``quantile`` of the reference values of ``field`` (e.g. 0.99, the
    reference p99) sets the line; ``r`` of the ``N`` reference values lie above it. Under no drift
    the exceedance probability p of the line is at most Beta(r + 1, N - r) distributed (the
    exceedance probability of the (r+1)-th largest of N exchangeable values). ``test="binomial"``:

    * ``confidence=0.99`` (default): p0 = the ``confidence`` quantile of that Beta, and the window
      count k of n is tested against Binomial(n, p0): p = P(K >= k), drift at p < alpha. With
      probability >= ``confidence`` over the draw of the reference, p <= p0 and the false-alarm
      rate is <= alpha for this reference: a tolerance guarantee, which holds for the one
      reference a deployment has. (With r ~ 20 the estimated p is noisy: a reference that saw
      16 of 2,000 above ||z|| = 5 where the population has 1.4 % doubled the false alarms of the
      marginal test below in bench/drift.py.)
    * ``confidence=None``: k against Beta-Binomial(n, r + 1, N - r), a false-alarm rate <= alpha on
      average over references (reference and window exchangeable), not for each reference.

    ``test="fixed"`` (the brief's rule): drift when k / n > ``max_share``;
    ``details["false_alarm_rate"]`` is that rule's false-alarm rate under no drift at this
    window size (from the Beta-Binomial, averaged over references).
    """

    name = "exceedance"
    _fitted = ("threshold_", "n_reference_", "n_above_")

    def __init__(self, field: str = "recon_mse", threshold: float | None = None, quantile: float | None = 0.99,
                 max_share: float = 0.01, test: str = "binomial", alpha: float = 0.01,
                 confidence: float | None = 0.99, name: str | None = None):
        self.field, self.threshold, self.quantile, self.max_share = field, threshold, quantile, max_share
        self.test, self.alpha, self.confidence = test, alpha, confidence
        if name is not None:
            self.name = name

    def fit(self, reference: Reference) -> Self:
        check_choice("test", self.test, ("binomial", "fixed"))
        _check_alpha(self.alpha)
        if not 0 <= self.max_share < 1:
            raise ConfigError(f"max_share must be in [0, 1), got {describe(self.max_share)}")
        if (self.threshold is None) == (self.quantile is None):
            raise ConfigError(f"give exactly one of threshold and quantile, got threshold={describe(self.threshold)}, "
                              f"quantile={describe(self.quantile)}")
        if self.quantile is not None and not 0 < self.quantile < 1:
            raise ConfigError(f"quantile must be in (0, 1), got {describe(self.quantile)}")
        _check_confidence(self.confidence)
        values = _reference(reference).require(self.field, type(self).__name__)
        self.threshold_ = float(self.threshold) if self.threshold is not None else float(
            np.quantile(values, self.quantile))
        self.n_reference_ = int(values.size)
        self.n_above_ = int((values > self.threshold_).sum())
        # the no-drift exceedance probability bound of the tolerance test (None: the marginal test)
        self.p0_ = None if self.confidence is None else float(
            stats.beta.ppf(self.confidence, self.n_above_ + 1, self.n_reference_ - self.n_above_))
        return self

    def null_distribution(self, n: int, marginal: bool = False) -> Any:
        """The no-drift bound on the count above the line in n requests: scipy's binom(n, p0), or
        betabinom(n, r + 1, N - r) when ``marginal`` or ``confidence`` is None."""
        self._check_fitted()
        if marginal or self.p0_ is None:
            return stats.betabinom(n, self.n_above_ + 1, self.n_reference_ - self.n_above_)
        return stats.binom(n, self.p0_)

    def score(self, window: Window) -> DetectorResult:
        self._check_fitted()
        v = self._check_window(window, 1).require(self.field, type(self).__name__)
        n, k = v.size, int((v > self.threshold_).sum())
        details = {"statistic": f"share of {self.field} > {self.threshold_:.6g}", "count": k,
                   "line": self.threshold_, "reference_share": self.n_above_ / self.n_reference_, "p0": self.p0_}
        if self.test == "fixed":
            null = self.null_distribution(n, marginal=True)
            details["false_alarm_rate"] = float(null.sf(math.floor(self.max_share * n)))
            return DetectorResult(self.name, k / n, k / n > self.max_share, self.max_share, None, n, details)
        p = float(self.null_distribution(n).sf(k - 1))
        return DetectorResult(self.name, k / n, p < self.alpha, self.alpha, p, n, details)


def recon_error_detector(test: str = "binomial", alpha: float = 0.01, field: str = "recon_mse") -> ExceedanceDetector:
    """The brief's rule: reconstruction error above the reference p99 in more than 1 % of a window."""
    return ExceedanceDetector(field, quantile=0.99, max_share=0.01, test=test, alpha=alpha, name="recon_p99")


def latent_norm_detector(test: str = "binomial", alpha: float = 0.01, threshold: float = 5.0) -> ExceedanceDetector:
    """The brief's rule: more than 0.1 % of the window with ||z|| > 5 (posterior-mean norm)."""
    return ExceedanceDetector("latent_norm", threshold=threshold, quantile=None, max_share=0.001, test=test,
                              alpha=alpha, name="latent_norm")


class RollingMeanDetector(Detector):
    """The mean over the last ``period_s`` seconds of each of ``fields`` vs the reference, 3-sigma.

    For a field with reference mean mu and standard deviation s over N images, and n window images
    in the last ``period_s`` (all of them when the window has no timestamps), z = (m - mu) / se with
    se = s * sqrt(1/n + 1/N) (the window mean's and the reference mean's sampling errors); drift
    when any |z| > ``n_sigma``. Per field and window the false-alarm rate is ~0.27 % (two-sided
    normal tail at 3 sigma, by the central limit theorem); over three fields about 0.8 %.
    """

    name = "rolling_mean"
    _fitted = ("mean_", "std_", "n_reference_")

    def __init__(self, fields: tuple[str, ...] = ("recon_mse", "kl", "latent_norm"), period_s: float = 300.0,
                 n_sigma: float = 3.0, min_n: int = 30, name: str | None = None):
        self.fields, self.period_s, self.n_sigma, self.min_n = fields, period_s, n_sigma, min_n
        if name is not None:
            self.name = name

    def fit(self, reference: Reference) -> Self:
        if not self.fields:
            raise ConfigError("fields must name at least one per-image array, got ()")
        for name, v in (("period_s", self.period_s), ("n_sigma", self.n_sigma)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise ConfigError(f"{name} must be a number > 0, got {describe(v)}")
        _check_int("min_n", self.min_n, 2)
        ref = _reference(reference)
        cols = {f: ref.require(f, type(self).__name__) for f in self.fields}
        self.mean_ = {f: float(v.mean()) for f, v in cols.items()}
        self.std_ = {f: float(v.std(ddof=1)) for f, v in cols.items()}
        self.n_reference_ = {f: int(v.size) for f, v in cols.items()}
        return self

    def score(self, window: Window) -> DetectorResult:
        self._check_fitted()
        window = self._check_window(window, 1)
        if window.timestamps is not None:
            recent = window.select(window.timestamps >= window.timestamps.max() - self.period_s)
        else:
            recent = window
        n = len(recent)
        if n < self.min_n:
            raise InputError(f"the last {self.period_s} s of the window hold {n} images, fewer than min_n={self.min_n}")
        z = {}
        for f in self.fields:
            v = recent.require(f, type(self).__name__)
            se = self.std_[f] * math.sqrt(1 / n + 1 / self.n_reference_[f])
            z[f] = float((v.mean() - self.mean_[f]) / max(se, 1e-300))
        worst = max(abs(v) for v in z.values())
        return DetectorResult(self.name, worst, worst > self.n_sigma, self.n_sigma, None, n,
                              {"statistic": "max |z| of the rolling means", "z": z,
                               "means": {f: float(recent.require(f, "").mean()) for f in self.fields},
                               "reference_means": self.mean_,
                               "span_s": self.period_s if window.timestamps is not None else None})


@dataclass(frozen=True)
class GateCounts:
    """What the data-quality gate did to one window's images: ``n`` images seen (accepted and rejected),
    ``rejected`` of them refused, ``by_reason`` the refusals per failed check (e.g. ``{"low_variance": 15}``).
    From :meth:`vaekit.monitoring.store.RecordStore.gate_counts`."""

    n: int
    rejected: int
    by_reason: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("n", "rejected"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"GateCounts.{key} must be an integer >= 0, got {describe(v)}")
        if self.rejected > self.n:
            raise InputError(f"GateCounts.rejected must be <= n, got rejected={self.rejected}, n={self.n}")


# the clean rejection share of the gate (docs/monitoring.md): MNIST test 0 / 10,000, Fashion-MNIST test 9 / 10,000
# (99 % upper bounds 0.046 % and 0.19 %), rounded up: a share the gate may refuse of good traffic
GATE_BASELINE_RATE = 0.002


class GateRejectionDetector(Detector):
    """The share of a window's images the data-quality gate refused (an image refused never reaches the
    model, so no other detector sees it: all-black or corrupted uploads show up here only).

    Drift when both (a) the share k / n exceeds ``max_share`` (1 %, the brief's "more than 1 % of
    requests in a window") and (b) a one-sided binomial test of k against Binomial(n, ``baseline_rate``)
    gives p = P(K >= k) < ``alpha``. (b) bounds the false-alarm rate by alpha whenever the gate's
    rejection rate of good traffic is at most ``baseline_rate`` (default 0.2 %: the measured clean
    rates, 0 % on MNIST and 0.09 % on Fashion-MNIST, with their 99 % upper bounds, rounded up);
    (a) keeps a large window from alarming on a share that is significant but small. ``score``
    takes :class:`GateCounts`, not a Window: a Window holds accepted images only.
    """

    name = "gate_rejections"
    _fitted = ("baseline_rate_",)

    def __init__(self, max_share: float = 0.01, alpha: float = 0.01, baseline_rate: float = GATE_BASELINE_RATE,
                 min_n: int = 1, name: str | None = None):
        self.max_share, self.alpha, self.baseline_rate, self.min_n = max_share, alpha, baseline_rate, min_n
        if name is not None:
            self.name = name

    def fit(self, reference: Reference | None = None) -> Self:
        """Validates the settings; the reference is not needed (the baseline rate is a setting)."""
        _check_alpha(self.alpha)
        _check_int("min_n", self.min_n, 1)
        for key in ("max_share", "baseline_rate"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1:
                raise ConfigError(f"{key} must be a number in [0, 1), got {describe(v)}")
        self.baseline_rate_ = float(self.baseline_rate)
        return self

    def score(self, counts: GateCounts) -> DetectorResult:
        self._check_fitted()
        if not isinstance(counts, GateCounts):
            raise InputError(f"counts must be a vaekit.monitoring.detectors.GateCounts, got {type(counts).__name__}")
        if counts.n < self.min_n:
            raise InputError(f"the window holds {counts.n} images, fewer than min_n={self.min_n} for {self.name}")
        n, k = counts.n, counts.rejected
        p = float(stats.binom(n, self.baseline_rate_).sf(k - 1)) if k > 0 else 1.0  # P(K >= k)
        share = k / n
        return DetectorResult(self.name, share, share > self.max_share and p < self.alpha, self.max_share, p, n,
                              {"statistic": "share of the window's images refused by the gate", "rejected": k,
                               "by_reason": dict(counts.by_reason), "baseline_rate": self.baseline_rate_,
                               "alpha": self.alpha})


def default_detectors(alpha: float = 0.01, kl: bool = True) -> dict[str, Detector]:
    """Every detector with its default settings, keyed by name (``kl=False`` for families without a KL)."""
    fields = ("recon_mse", "kl", "latent_norm") if kl else ("recon_mse", "latent_norm")
    dets: list[Detector] = [
        KSDetector(alpha=alpha), KSDetector(alpha=alpha, correction="bh", name="ks_latent_bh"),
        MomentsDetector(rule="fixed", name="moments_fixed"), MomentsDetector(rule="calibrated", alpha=alpha),
        MMDDetector(alpha=alpha), recon_error_detector(alpha=alpha),
        ExceedanceDetector("recon_mse", quantile=0.99, test="fixed", name="recon_p99_fixed"),
        latent_norm_detector(alpha=alpha),
        ExceedanceDetector("latent_norm", threshold=5.0, quantile=None, max_share=0.001, test="fixed",
                           name="latent_norm_fixed"),
        RollingMeanDetector(fields=fields), InputStatsDetector(alpha=alpha),
    ]
    return {d.name: d for d in dets}
