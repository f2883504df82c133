"""Anomaly scores, detector, typicality test and OOD metrics, against independent computations."""

from __future__ import annotations

import io
import json
import math
import zlib

import numpy as np
import pytest
import torch
from helpers import rand_images
from PIL import Image

from vaekit.anomaly import (
    SCORES,
    AnomalyDetector,
    NotFittedError,
    TypicalityTest,
    UnsupportedModelError,
    aupr,
    auroc,
    compressed_length,
    corrupt,
    fpr_at_tpr,
    has_capability,
    make_score,
    ood_datasets,
    ood_report,
    score_from_dict,
    score_images,
    score_to_dict,
    window_statistics,
)
from vaekit.anomaly.compression import png_bytes
from vaekit.errors import InputError, VaekitError
from vaekit.models import VAE, VAEConfig, build_model

pytestmark = pytest.mark.usefixtures("one_thread")

P_SHAPE = (1, 4, 4)  # 16 pixels
D = 3
SIGMA = 0.3
SCALES = torch.tensor([1.5, 0.8, 0.4], dtype=torch.float64)
B0 = 0.5


def _loadings() -> torch.Tensor:
    """W (16, 3) with orthogonal columns of norms SCALES (so W^T W is diagonal)."""
    q, _ = torch.linalg.qr(torch.randn(16, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    return q * SCALES


def linear_gaussian(exact_posterior: bool = True, shift: float = 0.15, widen: float = 0.5) -> VAE:
    """p(z) = N(0, I), p(x|z) = N(W z + b, sigma^2 I): log p(x) = log N(x; b, W W^T + sigma^2 I) in closed form.

    With orthogonal columns the exact posterior is diagonal: N(M^-1 W^T (x - b), sigma^2 M^-1), M = W^T W + sigma^2 I,
    which the linear encoder heads can represent exactly (``exact_posterior``) or miss (shifted and too wide).
    """
    model = VAE(VAEConfig(input_shape=P_SHAPE, latent_dim=D, hidden_sizes=(), likelihood="gaussian",
                          gaussian_sigma=SIGMA)).double()
    W = _loadings()
    m = SCALES.pow(2) + SIGMA**2  # diag of M
    A = W.T / m[:, None]  # (D, P) = M^-1 W^T
    with torch.no_grad():
        model.decoder.out.weight.copy_(W)
        model.decoder.out.bias.fill_(B0)
        model.to_mean.weight.copy_(A)
        model.to_mean.bias.copy_(-A.sum(1) * B0)
        model.to_logvar.weight.zero_()
        model.to_logvar.bias.copy_(torch.log(SIGMA**2 / m))
        if not exact_posterior:
            model.to_mean.bias.add_(shift)
            model.to_logvar.bias.add_(widen)
    return model.eval()


def closed_form_log_px(x: torch.Tensor) -> torch.Tensor:
    W = _loadings()
    cov = W @ W.T + SIGMA**2 * torch.eye(16, dtype=torch.float64)
    mvn = torch.distributions.MultivariateNormal(torch.full((16,), B0, dtype=torch.float64), covariance_matrix=cov)
    return mvn.log_prob(x.flatten(1).double())


def _x(n: int = 64, seed: int = 1) -> torch.Tensor:
    return rand_images(n, P_SHAPE, seed).double()


# -- each score against an independent computation ---------------------------------------------------
def test_elbo_and_nll_equal_the_closed_form_log_likelihood_under_the_exact_posterior():
    model, x = linear_gaussian(), _x()
    want = -closed_form_log_px(x)
    # exact posterior: every importance weight equals p(x), so any k gives log p(x) exactly
    for name, params in (("neg_elbo", {"k": 1}), ("neg_elbo", {"k": 7}), ("nll", {"k": 3})):
        got = score_images(model, x, name, **params)
        assert torch.allclose(got, want, atol=1e-8), name


def test_nll_converges_to_the_closed_form_with_a_poor_encoder():
    model, x = linear_gaussian(exact_posterior=False), _x(16)
    want = -closed_form_log_px(x)
    elbo = score_images(model, x, "neg_elbo", k=200)
    nll = score_images(model, x, "nll", k=20000)
    assert (elbo - want).min() > 0.05  # the ELBO is a strict bound with this posterior
    assert (nll - want).abs().max() < 0.02
    assert (nll <= elbo + 1e-6).all()


def test_recon_mse_kl_and_latent_norm_against_direct_formulas():
    model, x = linear_gaussian(), _x()
    W = _loadings()
    m = SCALES.pow(2) + SIGMA**2
    mu = (x.flatten(1) - B0) @ W / m  # (B, D), the exact posterior mean
    var = SIGMA**2 / m
    mean_x = mu @ W.T + B0  # decoder mean at the posterior mean, (B, 16)
    const = 16 * (math.log(SIGMA) + 0.5 * math.log(2 * math.pi))
    recon = 0.5 * ((x.flatten(1) - mean_x) ** 2).sum(1) / SIGMA**2 + const
    kl = 0.5 * (var + mu**2 - 1 - torch.log(var)).sum(1)
    assert torch.allclose(score_images(model, x, "recon"), recon, atol=1e-9)
    assert torch.allclose(score_images(model, x, "mse"), ((x.flatten(1) - mean_x) ** 2).mean(1), atol=1e-12)
    assert torch.allclose(score_images(model, x, "kl"), kl, atol=1e-9)
    assert torch.allclose(score_images(model, x, "latent_norm"), mu.norm(dim=1), atol=1e-9)


def test_mahalanobis_matches_numpy_on_the_aggregated_posterior():
    model = linear_gaussian()
    ref, x = _x(300, seed=5), _x(20, seed=6)
    s = make_score("mahalanobis", ridge=0.0).fit(model, ref)
    with torch.no_grad():
        q_ref, q_x = model.encode(ref), model.encode(x)
    mu = q_ref.mean.numpy()
    cov = np.cov(mu.T) + np.diag(np.exp(q_ref.logvar.numpy()).mean(0))
    diff = q_x.mean.numpy() - mu.mean(0)
    want = np.sqrt(np.einsum("bi,ij,bj->b", diff, np.linalg.inv(cov), diff))
    np.testing.assert_allclose(score_images(model, x, s).numpy(), want, rtol=1e-9)


def test_compressed_length_is_the_png_size_and_png_is_lossless():
    x = rand_images(3, (1, 28, 28), 4)
    x[1] = 0.0  # a constant image compresses far better than noise
    lengths = compressed_length(x)
    arr = torch.round(x * 255).to(torch.uint8).numpy()
    for i in range(3):
        data = png_bytes(arr[i])
        assert lengths[i].item() == pytest.approx(len(data) * 8 * math.log(2))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), arr[i, 0])  # lossless round trip
        buf = io.BytesIO()
        Image.fromarray(arr[i, 0]).save(buf, format="PNG", compress_level=9)
        assert len(buf.getvalue()) == len(data)
    # an all-zero image: the PNG is its 57 bytes of container around one zlib stream of the filtered rows
    raw = b"".join(b"\x00" + bytes(28) for _ in range(28))
    assert len(png_bytes(arr[1])) == 57 + len(zlib.compress(raw, 9))
    assert lengths[1] < lengths[0] / 5


def test_complexity_is_nll_minus_compressed_length():
    model, x = linear_gaussian(), _x(8)
    want = -closed_form_log_px(x) - compressed_length(x)
    assert torch.allclose(score_images(model, x, "complexity", k=2), want, atol=1e-8)


def _exact_posterior(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    W = _loadings()
    m = SCALES.pow(2) + SIGMA**2
    return (x.flatten(1) - B0) @ W / m, (SIGMA**2 / m).expand(x.shape[0], D)


def test_likelihood_regret_is_the_amortization_gap_in_closed_form():
    """With the ELBO as the bound, tuning the linear encoder on one image reaches the exact posterior,
    so the regret is KL(q(z|x) || p(z|x)) of the untuned encoder, a closed form for two Gaussians."""
    x = _x(2)
    poor = linear_gaussian(exact_posterior=False, shift=0.3, widen=1.0)
    before = [p.detach().clone() for p in poor.parameters()]
    with torch.no_grad():
        q = poor.encode(x)
    mean, var = _exact_posterior(x)
    qv = q.logvar.exp()
    want = 0.5 * (qv / var + (q.mean - mean) ** 2 / var - 1 + torch.log(var / qv)).sum(1)
    # small steps: Adam moves each of the 16 x 3 weights by about lr, the mean by about lr * sum(x)
    got = score_images(poor, x, "likelihood_regret", steps=1500, lr=2e-3, weight_decay=0.0, k=4000, bound="elbo")
    assert want.min() > 2
    assert torch.allclose(got, want, atol=0.15), (got, want)  # Monte Carlo error of the two ELBOs, and SGD noise
    assert all(torch.equal(a, b) for a, b in zip(before, poor.parameters(), strict=True))  # model untouched
    exact = linear_gaussian()
    r0 = score_images(exact, x, "likelihood_regret", steps=30, lr=1e-3, k=4000)  # the IWAE bound
    assert r0.abs().max() < 0.02  # nothing to gain: the encoder is already the exact posterior


def test_likelihood_regret_finds_the_encoder_parameters():
    from vaekit.anomaly.scores import LikelihoodRegret

    model = linear_gaussian()
    x = _x(1)
    params = LikelihoodRegret.encoder_parameters(model, x, None)
    names = {n for n, p in model.named_parameters() if any(p is q for q in params)}
    assert names == {"to_mean.weight", "to_mean.bias", "to_logvar.weight", "to_logvar.bias"}
