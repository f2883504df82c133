"""Canary analysis as a pure function: ``decide(production, canary, policy) -> Decision``.

The brief's rule: a canary serving 5% of traffic is rolled back when its reconstruction error or
FID is more than 2% worse than production's, and promoted after a passing window (24 h). Noise
alone must not roll back a good model, so "worse" is a one-sided statement at a confidence level:

* for each figure (mean and p99 of the per-image reconstruction error, and the mean KL) the ratio
  canary / production with one-sided confidence bounds L and U at ``confidence``: for means the
  delta method on the log ratio; for the p99 distribution-free order-statistic bounds of each
  window's quantile (Binomial counts), combined conservatively (Bonferroni over the two windows);
* **rollback** when L > 1 + margin for the reconstruction error (mean or p99): the canary is worse
  by more than the margin with that confidence; also when its FID is more than the margin above
  production's, when its latents drifted from its own reference profile while production's did
  not, or when its mean KL fell below ``kl_collapse`` x production's (posterior collapse);
* **promote** when both windows hold ``min_requests``, the canary has served ``min_duration_s``,
  nothing above rolled it back and U <= 1 + margin for the mean reconstruction error
  (non-inferiority shown; the p99 is a rollback criterion only, since bounding a p99 within 2%
  at 99% confidence takes on the order of 10^5 requests);
* **hold** otherwise, with the reason (too few requests, too short, or not yet conclusive).

Deterministic (no random draws) and cheap (a sort per window). Nothing here writes anything:
:mod:`vaekit.deploy.apply` is the one place that acts on a Decision through the registry,
recording its reasons and evidence in the alias history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.stats import binom, norm

from vaekit.errors import ConfigError, InputError, describe, finite_array

Action = Literal["promote", "hold", "rollback"]


@dataclass(frozen=True)
class CanaryPolicy:
    """When a canary is rolled back or promoted; the defaults are the brief's."""

    margin: float = 0.02  # the canary may be at most this much worse (2%, the brief)
    confidence: float = 0.99  # one-sided confidence of "worse" (rollback) and of "not worse" (promotion)
    min_requests: int = 500  # per version, before any statistical decision
    min_duration_s: float = 24 * 3600.0  # canary window before promotion (the brief's 24 h; shorten for tests)
    kl_collapse: float = 0.5  # roll back when the canary's mean KL < this x production's (posterior collapse)
    drift_alpha: float = 0.01  # a window's latent-drift p-value below this counts as drifted

    def __post_init__(self) -> None:
        for name, lo, hi in (("margin", 0.0, 10.0), ("confidence", 0.5, 1.0), ("kl_collapse", 0.0, 1.0),
                             ("drift_alpha", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v < hi or math.isnan(v):
                raise ConfigError(f"{name} must be a number in [{lo}, {hi}), got {describe(v)}")
        if isinstance(self.min_requests, bool) or not isinstance(self.min_requests, int) or self.min_requests < 1:
            raise ConfigError(f"min_requests must be a positive integer, got {describe(self.min_requests)}")
        if isinstance(self.min_duration_s, bool) or not isinstance(self.min_duration_s, int | float) \
                or self.min_duration_s < 0:
            raise ConfigError(f"min_duration_s must be a number >= 0, got {describe(self.min_duration_s)}")


@dataclass
class Window:
    """What one version served over a time window (one entry per served image)."""

    recon: np.ndarray  # (N,) per-image reconstruction error (per-pixel MSE), lower is better
    kl: np.ndarray | None = None  # (N,) per-image KL in nats (families with an ELBO)
    duration_s: float = 0.0  # how long this version has been serving in this role
    fid: float | None = None  # FID of samples from this version (same sample count for both)
    latent_drift_p: float | None = None  # p-value of the version's latents vs its own reference profile
    version: Any = None  # the registry version, for the evidence

    def __post_init__(self) -> None:
        self.recon = finite_array("recon", self.recon, 1, min_rows=0)  # an empty window waits
        if self.kl is not None:
            self.kl = finite_array("kl", self.kl, 1, min_rows=0)
            if self.kl.shape != self.recon.shape:
                raise InputError(f"kl must hold one value per image like recon ({self.recon.shape[0]}), "
                                 f"got {self.kl.shape[0]}")

    @property
    def n(self) -> int:
        return int(self.recon.shape[0])


@dataclass
class Decision:
    """What to do with the canary, why, and the figures behind it (JSON-safe)."""

    action: Action
    reasons: list[str]
    evidence: dict[str, Any] = field(default_factory=dict)


def mean_ratio_bounds(prod: np.ndarray, canary: np.ndarray, confidence: float) -> dict[str, float]:
    """Ratio of means canary/production and its one-sided bounds at ``confidence``: the delta method on
    the log ratio, SE^2 = s_c^2 / (n_c m_c^2) + s_p^2 / (n_p m_p^2) (both means must be > 0)."""
    mp, mc = float(prod.mean()), float(canary.mean())
    if mp <= 0 or mc <= 0:
        raise InputError(f"a ratio of means needs positive means, got production {mp:.4g}, canary {mc:.4g}")
    se = math.sqrt(canary.var(ddof=1) / (canary.size * mc**2) + prod.var(ddof=1) / (prod.size * mp**2))
    z = float(norm.ppf(confidence))
    r = mc / mp
    return {"ratio": r, "lower": r * math.exp(-z * se), "upper": r * math.exp(z * se)}


def quantile_bounds(x: np.ndarray, q: float, confidence: float) -> tuple[float, float]:
    """Distribution-free one-sided bounds (lower, upper) of the q-quantile of x, each holding with
    probability >= ``confidence``: order statistics from the Binomial(n, q) count below the quantile.
    The upper bound is inf when n is too small to have one."""
    xs = np.sort(x)
    n = xs.size
    lo = int(binom.ppf(1.0 - confidence, n, q))  # P(count >= lo) >= confidence: x_(lo) <= quantile
    hi = int(binom.ppf(confidence, n, q)) + 1  # x_(hi) >= quantile with probability >= confidence
    lower = float(xs[lo - 1]) if lo >= 1 else -math.inf
    upper = float(xs[hi - 1]) if hi <= n else math.inf
    return lower, upper


def p99_ratio_bounds(prod: np.ndarray, canary: np.ndarray, confidence: float) -> dict[str, float]:
    """Ratio of p99s canary/production with conservative one-sided bounds: each window's quantile bounds
    at 1 - (1 - confidence) / 2 (Bonferroni over the two windows), lower = L_c / U_p, upper = U_c / L_p."""
    each = 1.0 - (1.0 - confidence) / 2
    lc, uc = quantile_bounds(canary, 0.99, each)
    lp, up = quantile_bounds(prod, 0.99, each)
    r = float(np.quantile(canary, 0.99) / np.quantile(prod, 0.99))
    return {"ratio": r, "lower": lc / up if up > 0 else 0.0, "upper": uc / lp if lp > 0 else math.inf}


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (an unbounded p99, say) as None, so evidence is valid JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def decide(production: Window, canary: Window, policy: CanaryPolicy | None = None) -> Decision:
    """Roll back, promote or hold the canary (see the module docstring). Pure: no I/O, deterministic.
    The evidence is JSON-safe (an unbounded figure is None)."""
    d = _decide(production, canary, policy or CanaryPolicy())
    d.evidence = _json_safe(d.evidence)
    return d


def _decide(production: Window, canary: Window, policy: CanaryPolicy) -> Decision:
    if not isinstance(production, Window) or not isinstance(canary, Window):
        raise InputError(f"decide takes two Window objects, got {type(production).__name__} and "
                         f"{type(canary).__name__}")
    limit = 1.0 + policy.margin
    evidence: dict[str, Any] = {"policy": {"margin": policy.margin, "confidence": policy.confidence,
                                           "min_requests": policy.min_requests,
                                           "min_duration_s": policy.min_duration_s},
                                "production": {"version": production.version, "n": production.n},
                                "canary": {"version": canary.version, "n": canary.n,
                                           "duration_s": canary.duration_s}}
    worse: list[str] = []
    # figures that need no sample size: FID and drift flags are single numbers per window
    if production.fid is not None and canary.fid is not None:
        evidence["fid"] = {"production": production.fid, "canary": canary.fid}
        if canary.fid > production.fid * limit:
            worse.append(f"FID {canary.fid:.2f} is more than {policy.margin:.0%} above production's "
                         f"{production.fid:.2f}")
    if canary.latent_drift_p is not None:
        evidence["latent_drift_p"] = {"production": production.latent_drift_p, "canary": canary.latent_drift_p}
        prod_drifted = production.latent_drift_p is not None and production.latent_drift_p < policy.drift_alpha
        if canary.latent_drift_p < policy.drift_alpha and not prod_drifted:
            worse.append(f"the canary's latents drifted from its reference profile (p = {canary.latent_drift_p:.2g}"
                         f" < {policy.drift_alpha}) while production's did not")
    short = [f"{role} has {w.n} requests, fewer than {policy.min_requests}"
             for role, w in (("production", production), ("canary", canary)) if w.n < policy.min_requests]
    if short:
        if worse:
            return Decision("rollback", worse, evidence)
        return Decision("hold", [f"waiting: {s}" for s in short], evidence)
    shown_not_worse = False
    for figure, bounds in (("recon_mean", mean_ratio_bounds), ("recon_p99", p99_ratio_bounds)):
        b = bounds(production.recon, canary.recon, policy.confidence)
        evidence[figure] = b
        if b["lower"] > limit:
            worse.append(f"reconstruction error {figure.split('_')[1]} is {b['ratio'] - 1:+.1%} vs production "
                         f"(lower {policy.confidence:.0%} bound {b['lower'] - 1:+.1%} > +{policy.margin:.0%})")
        if figure == "recon_mean":  # the p99 only rolls back: showing it within 2% needs ~10^5 requests
            shown_not_worse = b["upper"] <= limit
    if production.kl is not None and canary.kl is not None:
        kl = mean_ratio_bounds(production.kl, canary.kl, policy.confidence)
        evidence["kl_mean"] = kl
        if kl["upper"] < policy.kl_collapse:
            worse.append(f"mean KL fell to {kl['ratio']:.0%} of production's (upper bound {kl['upper']:.0%} < "
                         f"{policy.kl_collapse:.0%}): posterior collapse")
    if worse:
        return Decision("rollback", worse, evidence)
    if not shown_not_worse:
        why = (f"not yet conclusive: the reconstruction error is not shown to be within {policy.margin:.0%} of "
               f"production's at {policy.confidence:.0%} confidence")
        return Decision("hold", [why], evidence)
    if canary.duration_s < policy.min_duration_s:
        return Decision("hold", [f"passing, waiting: the canary has served {canary.duration_s:.0f} s of the "
                                 f"{policy.min_duration_s:.0f} s window"], evidence)
    return Decision("promote", [f"reconstruction error within {policy.margin:.0%} of production's at "
                                f"{policy.confidence:.0%} confidence over {canary.n} requests and "
                                f"{canary.duration_s:.0f} s"], evidence)
