"""MSE and SSIM against references: a direct SSIM implementation and closed forms on known images."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import correlate

from vaekit.errors import InputError
from vaekit.evaluation.reconstruction import (
    ReconstructionMetrics,
    mse_per_image,
    reconstruction_metrics,
    ssim_per_image,
)
from vaekit.models import VAE, VAEConfig

C1, C2 = 0.01**2, 0.03**2


def reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. (2004), 11x11 Gaussian window (sigma 1.5), data range 1, as torchmetrics computes it:
    images extended by reflection (scipy's "mirror") and the SSIM map averaged over every pixel."""
    r = np.arange(11) - 5
    g = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()

    def f(t):
        return correlate(t, w, mode="mirror")

    mu_a, mu_b = f(a), f(b)
    va, vb, cov = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + C1) * (2 * cov + C2)) / ((mu_a**2 + mu_b**2 + C1) * (va + vb + C2))
    return float(s.mean())


def test_ssim_matches_a_direct_implementation():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 28, 28, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(3, 1, 28, 28, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = ssim_per_image(x, y)
    ref = [reference_ssim(x[i, 0].numpy(), y[i, 0].numpy()) for i in range(3)]
    assert np.allclose(got.numpy(), ref, atol=1e-5), (got, ref)


def test_ssim_on_known_images():
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ssim_per_image(x, x), torch.ones(2, dtype=torch.float64), atol=1e-6)
    # constant images a and b: SSIM = (2ab + C1) / (a^2 + b^2 + C1) (the structure term is C2/C2)
    a, b = 0.2, 0.7
    got = ssim_per_image(torch.full((1, 1, 20, 20), a), torch.full((1, 1, 20, 20), b)).item()
    assert got == pytest.approx((2 * a * b + C1) / (a * a + b * b + C1), abs=1e-5)
    # an inverted image is anti-correlated: SSIM < 0
    assert ssim_per_image(x, 1 - x).max() < 0


def test_mse_and_accumulator():
    x = torch.zeros(4, 1, 28, 28)
    y = torch.full((4, 1, 28, 28), 0.5)
    assert torch.allclose(mse_per_image(x, y), torch.full((4,), 0.25, dtype=torch.float64))
    acc = ReconstructionMetrics()
    acc.update(x[:2], y[:2])
    acc.update(x[2:], x[2:])
    res = acc.compute()
    assert res["n"] == 4 and res["mse"] == pytest.approx(0.125)
    assert res["mse_stderr"] == pytest.approx(np.std([0.25, 0.25, 0, 0], ddof=1) / math.sqrt(4))
    with pytest.raises(InputError, match="same shape"):
        acc.update(x, y[:2])
    with pytest.raises(InputError, match="11 x 11"):
        ssim_per_image(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_reconstruction_metrics_of_a_model():
    torch.manual_seed(0)
    m = VAE(VAEConfig(latent_dim=2, hidden_sizes=(8,)))
    x = torch.rand(10, 1, 28, 28)
    res = reconstruction_metrics(m, [(x[:6], None), (x[6:], None)], max_examples=8)
    assert res["n"] == 8 and 0 < res["mse"] < 1 and -1 <= res["ssim"] <= 1
    assert m.training  # mode restored
