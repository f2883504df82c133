"""The importance-sampled NLL against a linear-Gaussian model, where log p(x) is known in closed form."""

import math

import pytest
import torch
from torch import nn

from vaekit.errors import InputError
from vaekit.evaluation.nll import NLLAccumulator, log_likelihood, nll, supports_nll
from vaekit.models import VAE, VAEConfig
from vaekit.nn.distributions import DiagonalGaussian, GaussianLikelihood
from vaekit.objectives.likelihoods import log_standard_normal

D_Z, SIGMA = 2, 0.5
SHAPE = (1, 2, 2)  # x has 4 dimensions


class LinearGaussian(nn.Module):
    """z ~ N(0, I), x | z ~ N(Wz + b, sigma^2 I); q(z|x) = a diagonal Gaussian near the exact posterior.

    The exact posterior is N(S W^T (x - b) / sigma^2, S) with S = (I + W^T W / sigma^2)^-1; the
    encoder keeps its mean (shifted by ``shift``) and the diagonal of S (times ``inflate``), so
    the importance weights vary and the estimator has work to do.
    """

    conditional = False  # the flags of the model interface (vaekit.models.base.BaseModel)
    defines_elbo = True

    def __init__(self, inflate: float = 1.5, shift: float = 0.1):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.randn(4, D_Z, generator=g, dtype=torch.float64)
        self.b = torch.randn(4, generator=g, dtype=torch.float64)
        self.S = torch.linalg.inv(torch.eye(D_Z, dtype=torch.float64) + self.W.T @ self.W / SIGMA**2)
        self.inflate, self.shift = inflate, shift
        self.dummy = nn.Parameter(torch.zeros(1))

    def posterior_params(self, x):
        xf = x.flatten(1).double()
        mean = (xf - self.b) @ self.W @ self.S / SIGMA**2 + self.shift
        logvar = torch.log(torch.diagonal(self.S) * self.inflate).expand_as(mean)
        return mean, logvar

    def encode(self, x, y=None):
        return DiagonalGaussian(*self.posterior_params(x))

    def log_prior(self, z, y=None):
        return log_standard_normal(z)

    def decode(self, z, y=None):
        mean = (z @ self.W.T + self.b).reshape(*z.shape[:-1], *SHAPE)
        return GaussianLikelihood(mean, torch.tensor(math.log(SIGMA), dtype=torch.float64))

    def exact_log_px(self, x):
        cov = self.W @ self.W.T + SIGMA**2 * torch.eye(4, dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x.flatten(1).double())

    def exact_elbo(self, x):
        """E_q[log p(x|z) + log p(z) - log q(z|x)] in closed form for the diagonal q."""
        m, logvar = self.posterior_params(x)
        s = logvar.exp()
        xf = x.flatten(1).double()
        resid = xf - m @ self.W.T - self.b
        tr = (self.W.pow(2) * s[:, None, :]).sum((1, 2))  # tr(W diag(s) W^T)
        rec = -2 * math.log(2 * math.pi * SIGMA**2) - (resid.pow(2).sum(1) + tr) / (2 * SIGMA**2)
        prior = -0.5 * D_Z * math.log(2 * math.pi) - 0.5 * (m.pow(2).sum(1) + s.sum(1))
        ent = 0.5 * D_Z * (math.log(2 * math.pi) + 1) + 0.5 * logvar.sum(1)
        return rec + prior + ent


def _data(n=8, seed=1):
    m = LinearGaussian()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, D_Z, generator=g, dtype=torch.float64)
    x = z @ m.W.T + m.b + SIGMA * torch.randn(n, 4, generator=g, dtype=torch.float64)
    return m, x.reshape(n, *SHAPE)


def test_matches_closed_form_log_likelihood_within_005_nats():
    model, x = _data()
    torch.manual_seed(0)
    est = log_likelihood(model, x, k=5000)
    exact = model.exact_log_px(x)
    assert (est - exact).abs().max() < 0.05, (est, exact)
    # a lower bound in expectation: the estimate does not exceed log p(x) by more than MC noise
    assert (est - exact).mean() < 0.01


def test_exact_posterior_gives_exact_answer_at_any_k():
    model, x = _data()
    model.inflate, model.shift = 1.0, 0.0
    # with W^T W diagonal the exact posterior is diagonal: every weight equals p(x)
    q, _ = torch.linalg.qr(torch.randn(4, D_Z, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    model.W = 2.0 * q
    model.S = torch.linalg.inv(torch.eye(D_Z, dtype=torch.float64) + model.W.T @ model.W / SIGMA**2)
    torch.manual_seed(0)
    for k in (1, 7):
        assert torch.allclose(log_likelihood(model, x, k=k), model.exact_log_px(x), atol=1e-9)


def test_k1_equals_the_elbo_in_expectation():
    model, x = _data(n=3)
    reps = 20000
    torch.manual_seed(1)
    est = log_likelihood(model, x.repeat_interleave(reps, 0), k=1).view(3, reps)
    elbo = model.exact_elbo(x)
    se = est.std(1) / math.sqrt(reps)
    assert ((est.mean(1) - elbo).abs() < 4 * se + 1e-6).all(), (est.mean(1), elbo, se)
    assert (elbo < model.exact_log_px(x)).all()


def test_bound_tightens_as_k_grows():
    model, x = _data(n=200)
    exact = model.exact_log_px(x).mean().item()
    torch.manual_seed(2)
    means = [log_likelihood(model, x, k=k).mean().item() for k in (1, 10, 100, 1000)]
    assert means == sorted(means), means
    assert means[-1] <= exact + 0.01 and exact - means[-1] < exact - means[0], (means, exact)


def test_batched_equals_per_example_and_chunking_does_not_matter():
    model, x = _data(n=6)
    model.inflate, model.shift = 1.1, 0.02  # a close posterior: Monte Carlo sd ~0.004 nats at k = 5000
    torch.manual_seed(3)
    batched = log_likelihood(model, x, k=5000)
    single = torch.cat([log_likelihood(model, x[i : i + 1], k=5000) for i in range(6)])
    tiny_chunks = log_likelihood(model, x, k=5000, max_samples=64)  # 64 samples of one example at a time
    # the three runs use different random draws, so they agree up to Monte Carlo error (~6 sd here)
    assert torch.allclose(batched, single, atol=0.025)
    assert torch.allclose(batched, tiny_chunks, atol=0.025)
    assert torch.allclose(batched, model.exact_log_px(x), atol=0.025)


def test_nll_reports_nats_bits_per_dim_and_standard_error():
    model, x = _data(n=40)
    batches = [(x[i : i + 16], torch.zeros(len(x[i : i + 16]))) for i in range(0, 40, 16)]
    res = nll(model, batches, k=200, seed=5, per_example=True)
    per = -torch.tensor(res["log_px"], dtype=torch.float64)
    assert res["n"] == 40 and res["k"] == 200
    assert res["nll"] == pytest.approx(per.mean().item())
    assert res["nll_stderr"] == pytest.approx(per.std().item() / math.sqrt(40))
    assert res["bits_per_dim"] == pytest.approx(res["nll"] / (4 * math.log(2)))
    # reproducible from the seed, and the caller's RNG stream is untouched
    torch.manual_seed(9)
    before = torch.rand(1)
    torch.manual_seed(9)
    again = nll(model, batches, k=200, seed=5)
    assert torch.rand(1) == before and again["nll"] == res["nll"]
    assert nll(model, batches, k=200, seed=5, max_examples=20)["n"] == 20


def test_works_for_a_trained_style_vae_and_matches_its_elbo_at_k1():
    torch.manual_seed(0)
    m = VAE(VAEConfig(latent_dim=3, hidden_sizes=(16,))).eval()
    x = torch.bernoulli(torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    res = nll(m, [x], k=50)
    assert math.isfinite(res["nll"]) and res["nll"] > 0
    assert res["bits_per_dim"] == pytest.approx(res["nll"] / (784 * math.log(2)))


def test_bad_arguments_raise_clear_errors():
    model, x = _data(n=2)
    for bad in (0, -1, 2.5, True, 10**6):
        with pytest.raises(InputError, match="k must be an integer"):
            log_likelihood(model, x, k=bad)
    with pytest.raises(InputError, match="max_samples"):
        log_likelihood(model, x, k=2, max_samples=0)
    from vaekit.models import VQVAE

    with pytest.raises(InputError, match="defines no ELBO"):
        nll(VQVAE(), [x], k=2)
    with pytest.raises(InputError, match="no batches"):
        nll(model, [], k=2)
    with pytest.raises(InputError, match="1-D"):
        NLLAccumulator(4).update(torch.zeros(2, 2))
    assert supports_nll(model) == (True, "")


def test_fast_bernoulli_log_prob_equals_bce_with_logits_for_grey_targets_and_sample_dims():
    import torch.nn.functional as F

    from vaekit.objectives.likelihoods import bernoulli_log_prob

    g = torch.Generator().manual_seed(4)
    logits = (5 * torch.randn(7, 3, 1, 4, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    x = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64)  # grey levels
    ref = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum((2, 3, 4))
    got = bernoulli_log_prob(logits, x, 3)
    assert got.shape == (7, 3) and torch.allclose(got, ref)
    (g1,) = torch.autograd.grad(got.sum(), logits)
    (g2,) = torch.autograd.grad(ref.sum(), logits)
    assert torch.allclose(g1, g2)
    same_shape = bernoulli_log_prob(logits[0], x, 3)
    assert torch.allclose(same_shape, ref[0])
