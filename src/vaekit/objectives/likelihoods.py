"""Log-densities, summed over event dimensions, in nats."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)


def _event_sum(t: torch.Tensor, event_ndim: int) -> torch.Tensor:
    return t.flatten(-event_ndim).sum(-1) if event_ndim > 0 else t


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor, event_ndim: int) -> torch.Tensor:
    """log Bernoulli(x; sigmoid(logits)) summed over the last ``event_ndim`` dims.

    ``x`` holds targets in [0, 1] (grey levels are allowed: the result is then the
    negative binary cross-entropy). ``logits`` may carry extra leading sample dims.
    """
    if logits.shape != x.shape:
        x = x.expand_as(logits)
    return -_event_sum(F.binary_cross_entropy_with_logits(logits, x, reduction="none"), event_ndim)


def gaussian_log_prob(mean: torch.Tensor, log_sigma: torch.Tensor, x: torch.Tensor, event_ndim: int) -> torch.Tensor:
    """log N(x; mean, exp(log_sigma)^2) summed over the last ``event_ndim`` dims."""
    z = (x - mean) * torch.exp(-log_sigma)
    return _event_sum(-0.5 * z.pow(2) - log_sigma - 0.5 * LOG_2PI, event_ndim)


def log_normal_diag(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag(exp(logvar))) summed over the last dim: (..., D) -> (...)."""
    return (-0.5 * ((z - mean).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI)).sum(-1)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dim: (..., D) -> (...)."""
    return (-0.5 * (z.pow(2) + LOG_2PI)).sum(-1)
