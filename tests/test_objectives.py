"""Math checked against independent computations."""

import math

import torch

from vaekit.objectives import (
    bernoulli_log_prob,
    gaussian_log_prob,
    kl_normal,
    kl_standard_normal,
    log_normal_diag,
    log_standard_normal,
)


def test_closed_form_kl_matches_monte_carlo_within_standard_error():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 6, generator=g, dtype=torch.float64)
    logvar = torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.7
    n = 200_000
    z = mean + torch.exp(0.5 * logvar) * torch.randn(n, 4, 6, generator=g, dtype=torch.float64)
    # per-sample log q - log p, summed over dims -> (n, 4)
    diff = log_normal_diag(z, mean, logvar) - log_standard_normal(z)
    mc, se = diff.mean(0), diff.std(0) / math.sqrt(n)
    closed = kl_standard_normal(mean, logvar).sum(-1)
    assert torch.all((mc - closed).abs() < 4 * se), (mc, closed, se)


def test_kl_matches_torch_distributions():
    from torch.distributions import Normal, kl_divergence

    g = torch.Generator().manual_seed(1)
    mq, lq, mp, lp = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(4))
    ref = kl_divergence(Normal(mq, torch.exp(0.5 * lq)), Normal(mp, torch.exp(0.5 * lp)))
    assert torch.allclose(kl_normal(mq, lq, mp, lp), ref)
    ref0 = kl_divergence(Normal(mq, torch.exp(0.5 * lq)), Normal(torch.zeros_like(mq), torch.ones_like(mq)))
    assert torch.allclose(kl_standard_normal(mq, lq), ref0)


def test_bernoulli_log_prob_matches_reference():
    from torch.distributions import Bernoulli

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    x = torch.bernoulli(torch.full((3, 1, 4, 4), 0.5, dtype=torch.float64), generator=g)
    ref = Bernoulli(logits=logits).log_prob(x).sum((1, 2, 3))
    assert torch.allclose(bernoulli_log_prob(logits, x, 3), ref)
    # extra leading sample dim broadcasts against x
    many = bernoulli_log_prob(logits.expand(5, *logits.shape), x, 3)
    assert many.shape == (5, 3) and torch.allclose(many[2], ref)


def test_gaussian_log_prob_matches_reference():
    from torch.distributions import Normal

    g = torch.Generator().manual_seed(3)
    mean, x = (torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    log_sigma = torch.randn(1, 3, 3, generator=g, dtype=torch.float64) * 0.3
    ref = Normal(mean, torch.exp(log_sigma)).log_prob(x).sum((1, 2, 3))
    assert torch.allclose(gaussian_log_prob(mean, log_sigma, x, 3), ref)
