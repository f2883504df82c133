"""Distribution objects handed between encoder, decoder and objective.

Small and explicit on purpose (torch.distributions validates and broadcasts on
every call, which costs time in the training step).
"""

from __future__ import annotations

import torch

from vaekit.objectives.kl import kl_standard_normal
from vaekit.objectives.likelihoods import bernoulli_log_prob, gaussian_log_prob, log_normal_diag


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))); ``mean`` and ``logvar`` are (B, D)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean, self.logvar = mean, logvar

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def rsample(self, n: int | None = None) -> torch.Tensor:
        """Reparameterized sample z = mean + std * eps: (B, D), or (n, B, D) when ``n`` is given."""
        shape = self.mean.shape if n is None else (n, *self.mean.shape)
        eps = torch.randn(shape, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * eps

    sample = rsample

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) summed over D: (..., B, D) -> (..., B)."""
        return log_normal_diag(z, self.mean, self.logvar)

    def kl(self) -> torch.Tensor:
        """Closed-form KL(q || N(0, I)) per dimension, (B, D) nats."""
        return kl_standard_normal(self.mean, self.logvar)


class BernoulliLikelihood:
    """p(x|z) = Bernoulli(sigmoid(logits)) per pixel; ``logits`` (..., C, H, W)."""

    def __init__(self, logits: torch.Tensor, event_ndim: int = 3):
        self.logits, self.event_ndim = logits, event_ndim

    @property
    def mean(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over pixels: (..., B)."""
        return bernoulli_log_prob(self.logits, x, self.event_ndim)

    def sample(self) -> torch.Tensor:
        return torch.bernoulli(self.mean)


class GaussianLikelihood:
    """p(x|z) = N(mean, sigma^2) per pixel; ``log_sigma`` broadcasts against ``mean``."""

    def __init__(self, mean: torch.Tensor, log_sigma: torch.Tensor, event_ndim: int = 3):
        self.loc, self.log_sigma, self.event_ndim = mean, log_sigma, event_ndim

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over pixels, including the -0.5 log(2 pi) constant: (..., B)."""
        return gaussian_log_prob(self.loc, self.log_sigma, x, self.event_ndim)

    def sample(self) -> torch.Tensor:
        return self.loc + torch.exp(self.log_sigma) * torch.randn_like(self.loc)
