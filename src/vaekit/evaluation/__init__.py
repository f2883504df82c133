"""Evaluation: functional metrics and reports."""

from vaekit.evaluation.elbo import evaluate_elbo

__all__ = ["evaluate_elbo"]
