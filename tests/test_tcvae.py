"""beta-TCVAE: the KL decomposition checked against brute-force computations on tiny datasets."""

import itertools
import math

import pytest
import torch
from helpers import rand_images

from vaekit.errors import ConfigError, InputError
from vaekit.models import TCVAE, TCVAEConfig
from vaekit.objectives.likelihoods import log_normal_diag, log_standard_normal
from vaekit.objectives.tc import (
    log_aggregate_posterior,
    mss_log_weights,
    pairwise_log_density,
    tc_decomposition,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _posteriors(M, D, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(M, D, generator=g, dtype=torch.float64) * spread
    logvar = torch.randn(M, D, generator=g, dtype=torch.float64) * 0.3 - 0.5
    z = mean + torch.exp(0.5 * logvar) * torch.randn(M, D, generator=g, dtype=torch.float64)
    return z, mean, logvar


def _normal_pdf(v, m, lv):
    return math.exp(-0.5 * ((v - m) ** 2 / math.exp(lv) + lv + math.log(2 * math.pi)))


def _brute_force(z, mean, logvar, N, estimator):
    """Plain loops over samples i, posteriors j and dimensions d, straight from the paper's formulas."""
    M, D = z.shape
    mp = M - 1
    out_qz, out_prod = [], []
    for i in range(M):
        def weight(j, i=i):
            if estimator == "mws":
                return 1.0 / (N * M)
            if j == i:
                return 1.0 / N
            return (N - mp) / (N * mp) if j == (i + 1) % M else 1.0 / mp

        joint = sum(weight(j) * math.prod(_normal_pdf(z[i, d].item(), mean[j, d].item(), logvar[j, d].item())
                                          for d in range(D)) for j in range(M))
        prod = sum(math.log(sum(weight(j) * _normal_pdf(z[i, d].item(), mean[j, d].item(), logvar[j, d].item())
                                for j in range(M))) for d in range(D))
        out_qz.append(math.log(joint))
        out_prod.append(prod)
    return torch.tensor(out_qz, dtype=torch.float64), torch.tensor(out_prod, dtype=torch.float64)


def test_pairwise_log_density_matches_torch_distributions():
    from torch.distributions import Normal

    z, mean, logvar = _posteriors(4, 3)
    ref = Normal(mean[None], torch.exp(0.5 * logvar[None])).log_prob(z[:, None])
    assert torch.allclose(pairwise_log_density(z, mean, logvar), ref)


@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_estimators_match_brute_force_loops(estimator):
    z, mean, logvar = _posteriors(5, 3, seed=1)
    N = 40
    log_qz, log_prod = log_aggregate_posterior(pairwise_log_density(z, mean, logvar), N, estimator)
    ref_qz, ref_prod = _brute_force(z, mean, logvar, N, estimator)
    assert torch.allclose(log_qz, ref_qz, atol=1e-10) and torch.allclose(log_prod, ref_prod, atol=1e-10)


def test_mss_weights_rows_sum_to_one_with_one_stratum_entry_per_row():
    W = mss_log_weights(6, 100, torch.float64).exp()
    assert torch.allclose(W.sum(1), torch.ones(6, dtype=torch.float64))
    special = (100 - 5) / (100 * 5)
    assert ((W - special).abs() < 1e-12).sum(1).tolist() == [1] * 6  # exactly one per row (fixes the paper's code)
    assert torch.allclose(W.diagonal(), torch.full((6,), 1 / 100, dtype=torch.float64))


def test_mss_inner_estimate_is_unbiased_over_every_batch_of_a_tiny_dataset():
    """For a sample z of example n*, average the MSS density estimate over every ordered batch
    (n*, others drawn without replacement) and compare with the exact q(z) = (1/N) sum_n q(z|x_n)."""
    N, M, D = 5, 3, 2
    g = torch.Generator().manual_seed(3)
    means = torch.randn(N, D, generator=g, dtype=torch.float64)
    logvars = torch.randn(N, D, generator=g, dtype=torch.float64) * 0.3
    W = mss_log_weights(M, N, torch.float64).exp()
    for star in range(N):
        z = means[star] + torch.exp(0.5 * logvars[star]) * torch.randn(D, generator=g, dtype=torch.float64)
        exact = log_normal_diag(z, means, logvars).exp().mean()
        others = [n for n in range(N) if n != star]
        for pos in range(M):  # n* may sit at any row of the batch
            estimates = []
            for rest in itertools.permutations(others, M - 1):
                batch = list(rest[:pos]) + [star] + list(rest[pos:])
                dens = log_normal_diag(z, means[batch], logvars[batch]).exp()  # (M,)
                estimates.append((W[pos] * dens).sum())
            assert torch.allclose(torch.stack(estimates).mean(), exact, rtol=1e-12), (star, pos)


def test_mws_on_the_full_dataset_has_its_known_offsets():
    """With the whole tiny dataset as the batch, MWS's log q(z) is exactly log N below the exact value
    and its TC exactly (D - 1) log N above (module doc)."""
    N, D = 6, 3
    z, mean, logvar = _posteriors(N, D, seed=4)
    t = tc_decomposition(z, mean, logvar, N, "mws")
    exact_qz = torch.logsumexp(log_normal_diag(z[:, None], mean[None], logvar[None]), dim=1) - math.log(N)
    q_d = pairwise_log_density(z, mean, logvar)  # (N, N, D)
    exact_prod = (torch.logsumexp(q_d, dim=1) - math.log(N)).sum(1)
    assert torch.allclose(t.log_qz, exact_qz - math.log(N))
    assert torch.allclose(t.tc, exact_qz - exact_prod + (D - 1) * math.log(N))


@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_terms_sum_to_the_monte_carlo_kl(estimator):
    z, mean, logvar = _posteriors(7, 4, seed=5)
    t = tc_decomposition(z, mean, logvar, 1000, estimator)
    ref = log_normal_diag(z, mean, logvar) - log_standard_normal(z)
    assert torch.allclose(t.mi + t.tc + t.dim_kl, ref)


def test_posteriors_that_ignore_x_have_zero_mi_and_tc_under_mss():
    g = torch.Generator().manual_seed(6)
    M, D = 16, 5
    mean = torch.randn(1, D, generator=g, dtype=torch.float64).expand(M, D)
    logvar = torch.randn(1, D, generator=g, dtype=torch.float64).expand(M, D)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(M, D, generator=g, dtype=torch.float64)
    t = tc_decomposition(z, mean, logvar, 60000, "mss")
    assert t.tc.abs().max() < 1e-10 and t.mi.abs().max() < 1e-10


def _grid_dataset(correlated):
    """64 posteriors with std 0.6: means on an 8 x 8 grid (q(z) factorizes exactly) or on the diagonal."""
    v = torch.arange(8, dtype=torch.float64)
    if correlated:
        mean = torch.stack([v.repeat_interleave(8), v.repeat_interleave(8)], 1)
    else:
        mean = torch.cartesian_prod(v, v)
    # a shuffled batch, as in training: MSS down-weights row i's neighbour i + 1, which in grid
    # order would always be an adjacent grid point
    mean = mean[torch.randperm(len(mean), generator=torch.Generator().manual_seed(0))]
    return mean, torch.full_like(mean, 2 * math.log(0.6))


@pytest.mark.parametrize("correlated", [False, True])
def test_total_correlation_is_near_zero_for_a_factorized_aggregate_posterior(correlated):
    mean, logvar = _grid_dataset(correlated)
    N = mean.shape[0]
    g = torch.Generator().manual_seed(7)
    tcs, exact = [], []
    for _ in range(100):
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g, dtype=torch.float64)
        tcs.append(tc_decomposition(z, mean, logvar, N, "mss").tc.mean())
        q_d = pairwise_log_density(z, mean, logvar)
        log_qz = torch.logsumexp(q_d.sum(2), 1) - math.log(N)
        exact.append((log_qz - (torch.logsumexp(q_d, 1) - math.log(N)).sum(1)).mean())
    tc, tc_exact = torch.stack(tcs).mean().item(), torch.stack(exact).mean().item()
    if correlated:  # the control: a dependent aggregate posterior has a large TC, and MSS sees it
        assert tc_exact > 0.5 and abs(tc - tc_exact) < 0.15 * tc_exact, (tc, tc_exact)
    else:
        assert abs(tc_exact) < 1e-9  # q(z) = q(z_1) q(z_2) at every z
        assert abs(tc) < 0.05, tc  # MSS's small downward bias: the log of an unbiased estimate


def test_estimator_input_errors():
    z, mean, logvar = _posteriors(4, 2)
    with pytest.raises(InputError, match="dataset_size"):
        tc_decomposition(z, mean, logvar, 3, "mss")
    with pytest.raises(ConfigError, match="estimator"):
        tc_decomposition(z, mean, logvar, 100, "exact")
    with pytest.raises(InputError, match="at least 2"):
        tc_decomposition(z[:1], mean[:1], logvar[:1], 100, "mss")
    with pytest.raises(InputError, match=r"\(M, D\)"):
        tc_decomposition(z[0], mean, logvar, 100, "mss")


# -- the model ---------------------------------------------------------------------------------------
def _x(n=6):
    return rand_images(n)


@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_tcvae_loss_is_the_weighted_sum_of_its_terms(estimator):
    torch.manual_seed(0)
    cfg = TCVAEConfig(latent_dim=3, hidden_sizes=(16,), alpha=0.5, beta=4.0, gamma=2.0, estimator=estimator)
    m = TCVAE(cfg)
    m.on_train_data(500)
    out = m(_x())
    assert torch.allclose(out.loss, out.recon + 0.5 * out.mi + 4.0 * out.tc + 2.0 * out.dim_kl)
    assert set(out.terms()) == {"loss", "recon", "kl", "mi", "tc", "dim_kl"}
    # with unit weights it is the VAE's one-sample loss at the same noise
    unit = TCVAE(TCVAEConfig(latent_dim=3, hidden_sizes=(16,), beta=1.0, dataset_size=500, estimator=estimator))
    unit.load_state_dict(m.state_dict())
    unit.dataset_size.fill_(500)
    torch.manual_seed(1)
    o = unit(_x())
    post = o.posterior
    mc_kl = (log_normal_diag(o.z, post.mean, post.logvar) - log_standard_normal(o.z)).mean()
    assert torch.allclose(o.loss, o.recon + mc_kl, atol=1e-4)


def test_tcvae_takes_the_dataset_size_from_the_trainer_hook_and_validates():
    m = TCVAE(TCVAEConfig(latent_dim=2, hidden_sizes=(8,)))
    with pytest.raises(InputError, match="training-set size"):
        m(_x())
    m.on_train_data(3)
    with pytest.raises(InputError, match="larger than dataset_size"):
        m(_x())
    m.on_train_data(100)
    assert int(m.dataset_size) == 100 and torch.isfinite(m(_x()).loss)
    fixed = TCVAE(TCVAEConfig(latent_dim=2, hidden_sizes=(8,), dataset_size=50))
    fixed.on_train_data(100)  # an explicit config value wins
    assert int(fixed.dataset_size) == 50
    with pytest.raises(ConfigError, match="objective"):
        TCVAEConfig(objective="iwae", beta=1.0)
    with pytest.raises(ConfigError, match="estimator"):
        TCVAEConfig(estimator="both")
    with pytest.raises(ConfigError, match="alpha"):
        TCVAEConfig(alpha=-1.0)
    assert not m.supports_kl_control
