import math

import torch

from vaekit.evaluation.latent import active_units, mutual_information


def test_active_units_counts_units_whose_mean_varies():
    g = torch.Generator().manual_seed(0)
    mean = torch.zeros(1000, 5)
    mean[:, 0] = torch.randn(1000, generator=g)  # var ~ 1: active
    mean[:, 1] = 0.2 * torch.randn(1000, generator=g)  # var ~ 0.04: active
    mean[:, 2] = 0.05 * torch.randn(1000, generator=g)  # var ~ 0.0025: inactive
    assert active_units(mean) == 2
    assert active_units(mean, threshold=0.001) == 3


def test_mi_is_zero_for_an_encoder_that_ignores_x():
    g = torch.Generator().manual_seed(1)
    mean, logvar = torch.zeros(2000, 4), torch.zeros(2000, 4)
    assert abs(mutual_information(mean, logvar, generator=g)) < 1e-9


def test_mi_matches_gaussian_channel_formula():
    # x ~ N(0, 1) per dim, q(z|x) = N(x, s^2): I(x; z) = 0.5 log(1 + 1/s^2) per dim.
    # The estimator is bounded by log N; with N = 4000 and a moderate I it is close.
    g = torch.Generator().manual_seed(2)
    N, D, s = 4000, 2, 1.0
    x = torch.randn(N, D, generator=g)
    est = mutual_information(x, torch.full((N, D), 2 * math.log(s)), generator=g)
    exact = D * 0.5 * math.log(1 + 1 / s**2)
    assert abs(est - exact) < 0.05, (est, exact)


def test_mi_matches_the_direct_pairwise_density_sum():
    # the (c, N, D) broadcast the expanded quadratic replaces, on posteriors of mixed widths
    g = torch.Generator().manual_seed(3)
    N, D = 300, 6
    mean = 2 * torch.randn(N, D, generator=g, dtype=torch.float64)
    logvar = torch.randn(N, D, generator=g, dtype=torch.float64) - 1.0
    est = mutual_information(mean, logvar, generator=torch.Generator().manual_seed(4), chunk=64)
    noise = torch.randn(N, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    z = mean + torch.exp(0.5 * logvar) * noise
    var = logvar.exp()
    log_q = -0.5 * (((z[:, None, :] - mean[None]) ** 2 / var[None]) + logvar[None] + math.log(2 * math.pi)).sum(-1)
    own = torch.diagonal(log_q).mean()
    agg = (torch.logsumexp(log_q, dim=1) - math.log(N)).mean()
    assert abs(est - float(own - agg)) < 1e-9
