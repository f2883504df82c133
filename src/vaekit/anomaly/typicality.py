"""The batch typicality test of Nalisnick et al. (2019) for windows of images.

A model's typical set is where the average per-image negative log-likelihood of a batch lies near
the model's entropy. Fit estimates the entropy H as the mean score of one part of the reference
images and, by bootstrap over the other part, the (1 - alpha) quantile epsilon of
|mean of a window of ``window`` images - H| for in-distribution windows. A window whose
statistic |mean score - H| exceeds epsilon is flagged as out of distribution. Two-sided, so it
also flags windows a model finds too *likely*, the failure of a plain likelihood threshold.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from vaekit.anomaly.base import NotFittedError, check_images, check_labels, check_number, check_positive_int
from vaekit.anomaly.scores import as_score, score_from_dict, score_images, score_to_dict
from vaekit.errors import InputError, describe

FORMAT = "vaekit-typicality-test"


@dataclass
class TypicalityResult:
    """One window's test: ``statistic`` = |mean score - entropy| (nats), flagged when > ``epsilon``."""

    statistic: float
    epsilon: float
    mean_score: float
    entropy: float
    n: int
    ood: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TypicalityTest:
    """Args: ``model``; ``score`` (a per-image score; default -ELBO, k = 1); ``window`` (images per tested
    window); ``alpha`` (false-alarm rate per in-distribution window); ``bootstraps``; ``seed``;
    ``batch_size``."""

    def __init__(self, model: Any, score: Any = "neg_elbo", window: int = 100, alpha: float = 0.01, *,
                 bootstraps: int = 2000, seed: int = 0, batch_size: int = 256):
        self.model, self.score, self.window, self.alpha = model, score, window, alpha
        self.bootstraps, self.seed, self.batch_size = bootstraps, seed, batch_size

    def _check_args(self) -> None:
        check_positive_int("window", self.window)
        check_number("alpha", self.alpha, low=0.0, high=1.0, open_low=True)
        if self.alpha >= 1:
            raise InputError(f"alpha must be in (0, 1), got {describe(self.alpha)}")
        check_positive_int("bootstraps", self.bootstraps, upper=10_000_000)
        check_positive_int("batch_size", self.batch_size)

    def fit(self, reference: Any, y: Any = None) -> TypicalityTest:
        """Entropy from the first half of ``reference`` (held-out in-distribution images, seeded split),
        epsilon from bootstrapped windows of the second half."""
        self._check_args()
        score = as_score(self.score)
        score.check_model(self.model)
        if score.needs_fit:
            raise InputError(f"the typicality test needs a score without fitted statistics, got {score.name!r}")
        reference = check_images(self.model, reference, "reference")
        n = reference.shape[0]
        y = check_labels(self.model, y, n)
        if n < 4:
            raise InputError(f"reference must hold at least 4 images, got {n}")
        s = score_images(self.model, reference, score, y, batch_size=self.batch_size, seed=self.seed).numpy()
        perm = np.random.default_rng(self.seed).permutation(n)
        a, b = s[perm[: n // 2]], s[perm[n // 2 :]]
        rng = np.random.default_rng(self.seed + 1)
        boot = b[rng.integers(0, b.size, size=(self.bootstraps, self.window))].mean(1)
        self.score_ = score
        self.entropy_ = float(a.mean())
        self.epsilon_ = float(np.quantile(np.abs(boot - self.entropy_), 1 - self.alpha))
        self.n_reference_ = n
        return self

    def test(self, window: Any, y: Any = None) -> TypicalityResult:
        """Test one window of exactly ``window`` images (N, C, H, W)."""
        if not hasattr(self, "epsilon_"):
            raise NotFittedError("this TypicalityTest is not fitted yet: call fit(reference) first")
        window = check_images(self.model, window, "window")
        if window.shape[0] != self.window:
            raise InputError(f"window must hold {self.window} images (epsilon was bootstrapped for that size), "
                             f"got {window.shape[0]}")
        s = score_images(self.model, window, self.score_, y, batch_size=self.batch_size, seed=self.seed)
        m = float(s.mean())
        stat = abs(m - self.entropy_)
        return TypicalityResult(stat, self.epsilon_, m, self.entropy_, int(s.numel()), bool(stat > self.epsilon_))

    def to_dict(self) -> dict[str, Any]:
        if not hasattr(self, "epsilon_"):
            raise NotFittedError("this TypicalityTest is not fitted yet: call fit(reference) first")
        doc = {"format": FORMAT, "format_version": 1, "score": score_to_dict(self.score_), "window": self.window,
               "alpha": self.alpha, "bootstraps": self.bootstraps, "seed": self.seed, "batch_size": self.batch_size,
               "entropy": self.entropy_, "epsilon": self.epsilon_, "n_reference": self.n_reference_}
        json.dumps(doc, allow_nan=False)
        return doc

    @classmethod
    def from_dict(cls, data: Any, model: Any) -> TypicalityTest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(f"data must be a dict written by TypicalityTest.to_dict, got {describe(data)}")
        try:
            t = cls(model, score_from_dict(data["score"]), data["window"], data["alpha"],
                    bootstraps=data["bootstraps"], seed=data["seed"], batch_size=data["batch_size"])
            t._check_args()
            t.score_, t.entropy_, t.epsilon_ = t.score, float(data["entropy"]), float(data["epsilon"])
            t.n_reference_ = int(data["n_reference"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"typicality dict is missing or has a bad field: {exc}") from exc
        t.score_.check_model(model)
        return t


def window_statistics(test: TypicalityTest, scores: Any, n_windows: int, seed: int = 0) -> np.ndarray:
    """|mean - entropy_| of ``n_windows`` windows of ``test.window`` per-image scores drawn without
    replacement (seeded) from ``scores`` (N,), as :meth:`TypicalityTest.test` computes them."""
    if not hasattr(test, "epsilon_"):
        raise NotFittedError("this TypicalityTest is not fitted yet: call fit(reference) first")
    s = np.asarray(scores.numpy() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    check_positive_int("n_windows", n_windows)
    if s.ndim != 1 or s.size < test.window:
        raise InputError(f"scores must be 1-D with at least window={test.window} values, got shape {s.shape}")
    rng = np.random.default_rng(seed)
    means = np.array([s[rng.permutation(s.size)[: test.window]].mean() for _ in range(n_windows)])
    return np.abs(means - test.entropy_)
