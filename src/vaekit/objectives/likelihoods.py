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
    Computed as sum(x * l) - sum(softplus(l)), the same function as BCE-with-logits in two passes
    over the logits instead of five; with sample dims the first sum is one batched matmul, which
    matters for importance sampling with thousands of samples.
    """
    if event_ndim == 0:
        return x * logits - F.softplus(logits)
    if logits.ndim > x.ndim and logits.shape[logits.ndim - x.ndim :] == x.shape and x.ndim > event_ndim:
        lead = logits.shape[: logits.ndim - x.ndim]
        lf = logits.reshape(-1, *x.shape).flatten(-event_ndim)  # (S, B, P)
        xf = x.flatten(-event_ndim).to(lf.dtype)  # (B, P)
        xl = torch.einsum("sbp,bp->sb", lf, xf).reshape(*lead, *x.shape[: x.ndim - event_ndim])
    else:
        xl = _event_sum(logits * x, event_ndim)
    return xl - _event_sum(F.softplus(logits), event_ndim)


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
