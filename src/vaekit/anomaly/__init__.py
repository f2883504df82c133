"""Anomaly and out-of-distribution scores for vaekit models.

* :mod:`~vaekit.anomaly.scores`: per-image scores (reconstruction error, -ELBO, importance-sampled
  -log p(x), KL, latent norm, Mahalanobis distance to the aggregated posterior, input-complexity
  corrected likelihood, Likelihood Regret, typicality, ensembles) and :func:`score_images`.
* :class:`AnomalyDetector`: a threshold at a percentile of held-out in-distribution scores,
  scikit-learn style, stored as a JSON-safe dict.
* :class:`TypicalityTest`: the batch typicality test of Nalisnick et al. (2019) for windows.
* :func:`ood_report`, :func:`ood_datasets`: AUROC, AUPR and FPR at 95% TPR per score, histograms.

See docs/anomaly.md for every score's formula, cost, needs and failure modes.
"""

from vaekit.anomaly.base import CAPABILITIES, NotFittedError, Score, UnsupportedModelError, has_capability
from vaekit.anomaly.compression import compressed_length
from vaekit.anomaly.detector import AnomalyDetector, model_fingerprint
from vaekit.anomaly.metrics import aupr, auroc, fpr_at_tpr, ood_metrics
from vaekit.anomaly.ood import CORRUPTIONS, DEFAULT_SCORES, OOD_DATA, corrupt, ood_datasets, ood_report
from vaekit.anomaly.scores import SCORES, make_score, score_from_dict, score_images, score_to_dict
from vaekit.anomaly.typicality import TypicalityResult, TypicalityTest, window_statistics

__all__ = [
    "CAPABILITIES", "CORRUPTIONS", "DEFAULT_SCORES", "OOD_DATA", "SCORES", "AnomalyDetector", "NotFittedError",
    "Score", "TypicalityResult", "TypicalityTest", "UnsupportedModelError", "aupr", "auroc", "compressed_length",
    "corrupt", "fpr_at_tpr", "has_capability", "make_score", "model_fingerprint", "ood_datasets", "ood_metrics",
    "ood_report", "score_from_dict", "score_images", "score_to_dict", "window_statistics",
]
