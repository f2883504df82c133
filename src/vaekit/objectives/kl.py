"""Closed-form KL divergences between diagonal Gaussians, per latent dimension, in nats."""

from __future__ import annotations

import torch


def kl_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) elementwise: (..., D) -> (..., D).

    0.5 * (mean^2 + exp(logvar) - 1 - logvar) (Kingma & Welling 2014, Appendix B).
    """
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_normal(
    mean_q: torch.Tensor, logvar_q: torch.Tensor, mean_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean_q, exp(logvar_q)) || N(mean_p, exp(logvar_p))) elementwise, (..., D)."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mean_q - mean_p).pow(2)) / logvar_p.exp() - 1.0)
