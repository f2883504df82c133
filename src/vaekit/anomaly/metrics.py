"""Detection metrics of a score separating in-distribution (negative) from OOD (positive) images.

Larger scores mean "more anomalous"; the out-of-distribution images are the positive class.

* AUROC: P(s_out > s_in) + P(s_out = s_in) / 2, the Mann-Whitney U statistic over n_in n_out
  (mid-ranks for ties).
* AUPR: average precision with OOD positive, sum_t (R_t - R_{t-1}) P_t over the distinct score
  thresholds t from high to low (scikit-learn's ``average_precision_score``); a chance-level score
  gets the OOD share of the pooled images.
* FPR at 95% TPR: the share of in-distribution images flagged at the highest threshold that still
  flags at least 95% of the OOD images (scores >= threshold are flagged).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from vaekit.errors import InputError, describe


def _as_scores(values: Any, name: str) -> np.ndarray:
    arr = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    if arr.ndim != 1 or arr.size == 0:
        raise InputError(f"{name} must be a non-empty 1-D array of scores, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"{name} holds {int((~np.isfinite(arr)).sum())} non-finite scores")
    return arr.astype(np.float64)


def auroc(in_scores: Any, out_scores: Any) -> float:
    """Area under the ROC curve, OOD positive: P(s_out > s_in) + P(tie) / 2."""
    a, b = _as_scores(in_scores, "in_scores"), _as_scores(out_scores, "out_scores")
    ranks = rankdata(np.concatenate([a, b]))  # mid-ranks, 1-based
    u = ranks[a.size:].sum() - b.size * (b.size + 1) / 2.0
    return float(u / (a.size * b.size))


def aupr(in_scores: Any, out_scores: Any) -> float:
    """Average precision with OOD positive over the distinct thresholds, high to low."""
    a, b = _as_scores(in_scores, "in_scores"), _as_scores(out_scores, "out_scores")
    s = np.concatenate([a, b])
    pos = np.concatenate([np.zeros(a.size), np.ones(b.size)])
    order = np.argsort(-s, kind="mergesort")
    s, pos = s[order], pos[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each run of equal scores
    tp = np.cumsum(pos)[last]
    flagged = last + 1.0
    precision, recall = tp / flagged, tp / b.size
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(in_scores: Any, out_scores: Any, tpr: float = 0.95) -> float:
    """In-distribution share flagged at the highest threshold flagging >= ``tpr`` of the OOD images."""
    if not isinstance(tpr, int | float) or isinstance(tpr, bool) or not 0 < tpr <= 1:
        raise InputError(f"tpr must be a number in (0, 1], got {describe(tpr)}")
    a, b = _as_scores(in_scores, "in_scores"), _as_scores(out_scores, "out_scores")
    need = math.ceil(tpr * b.size - 1e-9)  # OOD images to flag
    threshold = np.sort(b)[::-1][need - 1]
    return float(np.mean(a >= threshold))


def ood_metrics(in_scores: Any, out_scores: Any) -> dict[str, float]:
    """{"auroc", "aupr", "fpr95"} of one score on one pair of image sets."""
    return {"auroc": auroc(in_scores, out_scores), "aupr": aupr(in_scores, out_scores),
            "fpr95": fpr_at_tpr(in_scores, out_scores, 0.95)}
