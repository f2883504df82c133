"""The IWAE objective: the same estimator code as the NLL evaluation, and the bound's known properties."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import rand_images

from vaekit.errors import ConfigError, InputError
from vaekit.models import CVAE, VAE, CVAEConfig, VAEConfig
from vaekit.objectives.iwae import importance_terms, iwae_bound, log_importance_weights
from vaekit.objectives.kl_control import KLControl

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(n=6):
    return rand_images(n)


def test_iwae_bound_is_the_log_mean_exp_of_the_weights():
    log_w = torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 30
    w = log_w.numpy()
    ref = [float(np.log(np.mean(np.exp(w[:, b] - w[:, b].max()))) + w[:, b].max()) for b in range(3)]
    assert np.allclose(iwae_bound(log_w).numpy(), ref)


def test_vae_loss_is_the_shared_estimator_at_the_same_noise():
    torch.manual_seed(0)
    m = VAE(VAEConfig(latent_dim=3, hidden_sizes=(16,), objective="iwae", iwae_k=7))
    x = _x()
    torch.manual_seed(5)
    out = m(x)
    torch.manual_seed(5)
    ref = -iwae_bound(log_importance_weights(m, x, 7)).mean()
    assert torch.equal(out.loss, ref) and torch.equal(out.iwae, -ref)
    torch.manual_seed(5)
    t = importance_terms(m, x, 7)
    assert torch.allclose(out.recon, -t.log_px_z.mean())
    assert torch.allclose(out.kl, t.posterior.kl().sum(1).mean())
    # the weights are log p(x|z) + log p(z) - log q(z|x), computed independently with torch.distributions
    from torch.distributions import Bernoulli, Normal

    q = t.posterior
    logits = m.decoder(t.z.reshape(-1, 3)).view(7, 6, 1, 28, 28)
    ref_w = (Bernoulli(logits=logits, validate_args=False).log_prob(x.expand(7, *x.shape)).sum((2, 3, 4))
             + Normal(0.0, 1.0).log_prob(t.z).sum(-1) - Normal(q.mean, q.std).log_prob(t.z).sum(-1))
    assert torch.allclose(t.log_w, ref_w, atol=1e-3)


def test_cvae_iwae_uses_the_condition_everywhere():
    torch.manual_seed(0)
    m = CVAE(CVAEConfig(latent_dim=3, hidden_sizes=(16,), objective="iwae", iwae_k=4, learned_prior=True)).eval()
    x, y = _x(), torch.arange(6)
    torch.manual_seed(3)
    out = m(x, y)
    torch.manual_seed(3)
    ref = -iwae_bound(log_importance_weights(m, x, 4, F.one_hot(y, 10).float())).mean()
    assert torch.allclose(out.loss, ref)


def test_the_bound_tightens_with_k():
    """E[L_1] <= E[L_5] <= E[L_50] (Burda et al., Theorem 1), on a fixed untrained model."""
    torch.manual_seed(0)
    m = VAE(VAEConfig(latent_dim=4, hidden_sizes=(16,))).eval()
    x = _x(4)
    with torch.no_grad():
        # 40 independent estimates of each bound, from one batch of weights cut into groups of k
        bounds = {k: torch.stack([iwae_bound(w) for w in log_importance_weights(m, x, 40 * k).split(k)]).mean(0)
                  for k in (1, 5, 50)}
    assert (bounds[1] < bounds[5]).all() and (bounds[5] < bounds[50]).all()


def test_iwae_config_and_input_errors():
    with pytest.raises(ConfigError, match="beta"):
        VAEConfig(objective="iwae", beta=4.0)
    with pytest.raises(ConfigError, match="objective"):
        VAEConfig(objective="vi")
    with pytest.raises(ConfigError, match="iwae_k"):
        VAEConfig(objective="iwae", iwae_k=0)
    m = VAE(VAEConfig(latent_dim=2, hidden_sizes=(8,), objective="iwae", iwae_k=2))
    assert not m.supports_kl_control and VAE(VAEConfig()).supports_kl_control
    with pytest.raises(InputError, match="iwae"):
        m(_x(), kl_control=KLControl(weight=0.5))
    with pytest.raises(InputError, match="iwae"):
        m(_x(), beta=2.0)
    assert torch.isfinite(m(_x(), kl_control=KLControl()).loss)  # the neutral control is accepted
    with pytest.raises(InputError, match="positive integer"):
        log_importance_weights(m, _x(), 0)


def test_one_sample_weights_average_to_the_closed_form_elbo():
    """k = 1: -log w is an unbiased estimate of the loss that objective 'elbo' computes with the
    closed-form KL: E[-log w] = E_q[-log p(x|z)] + KL(q || p)."""
    torch.manual_seed(0)
    m = VAE(VAEConfig(latent_dim=2, hidden_sizes=(8,))).eval()
    x = _x(3)
    n = 20000
    with torch.no_grad():
        t = importance_terms(m, x, n)  # n independent one-sample estimates per example
        neg_w = -t.log_w  # (n, B)
        closed = -t.log_px_z.mean(0) + t.posterior.kl().sum(1)  # recon (same draws) + closed-form KL
    se = (t.log_pz - t.log_qz_x).std(0) / math.sqrt(n)  # the only difference is the Monte Carlo KL
    assert ((neg_w.mean(0) - closed).abs() < 4 * se).all()
