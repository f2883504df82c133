"""MIG, both estimators: ~1 when the code is the factors, ~0 for noise; the pieces against references."""

import itertools
import math

import numpy as np
import pytest
import torch

from vaekit.errors import InputError
from vaekit.evaluation.mig import (
    discrete_mutual_info,
    discretize,
    marginal_entropies,
    mig_histogram,
    mig_sampling,
)

SIZES = (3, 6, 10, 8)  # every factor has <= 20 values, so 20 bins keep every value apart


def _grid(repeat=4):
    f = np.array(list(itertools.product(*[range(s) for s in SIZES])), dtype=np.int64)
    return np.repeat(f, repeat, axis=0)  # (N, 4): the full grid, each combination `repeat` times


def _entropy(labels):
    _, counts = np.unique(labels, return_counts=True, axis=0)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_discrete_mutual_info_matches_entropy_identity():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 3000)
    b = (a + rng.integers(0, 3, 3000)) % 7
    ref = _entropy(a) + _entropy(b) - _entropy(np.stack([a, b], 1))  # I = H(a) + H(b) - H(a, b)
    assert discrete_mutual_info(a, b) == pytest.approx(ref, abs=1e-12)
    assert discrete_mutual_info(a, a) == pytest.approx(_entropy(a))


def test_discretize_uses_equal_width_bins_over_the_range():
    codes = np.array([[0.0], [0.49], [0.51], [1.0]])
    assert discretize(codes, 2)[:, 0].tolist() == [1, 1, 2, 2]


def test_histogram_mig_is_one_when_the_code_is_the_factors():
    f = _grid()
    res = mig_histogram(f.astype(float), f, ["a", "b", "c", "d"])
    assert res.estimator == "histogram" and res.score == pytest.approx(1.0, abs=1e-9)
    # jitter moves a few codes across bin edges: still ~1
    codes = f.astype(float) + 0.01 * np.random.default_rng(1).standard_normal(f.shape)
    assert mig_histogram(codes, f).score == pytest.approx(1.0, abs=0.01)
    # a code that also holds the factors in a different order and scale is just as disentangled
    assert mig_histogram(f[:, ::-1] * [1.0, -3, 2, 5], f).score == pytest.approx(1.0, abs=1e-9)
    d = res.to_dict()
    assert d["mig_histogram"] == res.score and "histogram" in d["description"]


def test_histogram_mig_is_zero_for_noise_and_low_for_entangled_codes():
    f = _grid(repeat=10)
    rng = np.random.default_rng(2)
    assert mig_histogram(rng.standard_normal((len(f), 6)), f).score < 0.02
    # two dims that each mix two factors: both are informative, the gap is small
    mixed = np.stack([f[:, 0] / 3 + f[:, 1] / 6, f[:, 0] / 3 - f[:, 1] / 6, f[:, 2], f[:, 3]], 1)
    res = mig_histogram(mixed, f)
    assert res.per_factor[2] == pytest.approx(1.0) and res.per_factor[0] < 0.5


def _posteriors(f, noise=False, seed=3):
    g = torch.Generator().manual_seed(seed)
    if noise:
        mean = torch.randn(len(f), 5, generator=g, dtype=torch.float64)
        return mean, torch.zeros_like(mean)
    mean = torch.tensor(f / np.array(SIZES), dtype=torch.float64)  # dim j encodes factor j
    mean = torch.cat([mean, torch.randn(len(f), 1, generator=g, dtype=torch.float64)], 1)  # plus a noise dim
    logvar = torch.full_like(mean, 2 * math.log(0.005))
    logvar[:, -1] = 0.0
    return mean, logvar


def test_sampling_mig_is_one_when_the_code_is_the_factors():
    f = _grid(repeat=2)
    mean, logvar = _posteriors(f)
    res = mig_sampling(mean, logvar, f, SIZES, generator=torch.Generator().manual_seed(0))
    assert res.estimator == "sampling"
    assert res.score == pytest.approx(1.0, abs=0.03), res.per_factor
    mi = np.array(res.mutual_info)  # (D, K): I(z_j; v_j) = log |v_j|
    assert np.allclose(np.diag(mi[:4]), np.log(SIZES), atol=0.05)
    assert res.to_dict()["mig_sampling"] == res.score


def test_sampling_mig_is_zero_for_noise():
    f = _grid(repeat=2)
    mean, logvar = _posteriors(f, noise=True)
    assert mig_sampling(mean, logvar, f, SIZES, generator=torch.Generator().manual_seed(0)).score < 0.03


def test_marginal_entropy_of_identical_standard_normals():
    mean, logvar = torch.zeros(500, 2, dtype=torch.float64), torch.zeros(500, 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    samples = torch.randn(500, 2, generator=g, dtype=torch.float64)
    h = marginal_entropies(samples, mean, logvar, generator=g)
    exact = 0.5 * math.log(2 * math.pi * math.e)
    assert torch.allclose(h, torch.full((2,), exact, dtype=torch.float64), atol=0.1)


def test_bad_inputs_raise_clear_errors():
    f = _grid()
    with pytest.raises(InputError, match="factors must be an integer array"):
        mig_histogram(np.zeros((len(f), 3)), f[:10])
    with pytest.raises(InputError, match="single value"):
        mig_histogram(np.random.default_rng(0).standard_normal((len(f), 3)), np.zeros((len(f), 1), dtype=np.int64))
    with pytest.raises(InputError, match="at least 2 latent"):
        mig_histogram(np.random.default_rng(0).standard_normal((len(f), 1)), f)
    mean, logvar = _posteriors(f)
    with pytest.raises(InputError, match="factor_sizes"):
        mig_sampling(mean, logvar, f, (3, 6))
    with pytest.raises(InputError, match="logvar"):
        mig_sampling(mean, logvar[:, :2], f, SIZES)


def test_dsprites_mig_runs_both_estimators_and_names_them():
    from vaekit.evaluation.mig import dsprites_mig
    from vaekit.models import VAE, VAEConfig

    torch.manual_seed(0)
    model = VAE(VAEConfig(input_shape=(1, 64, 64), latent_dim=3, architecture="conv", conv_channels=(4, 4, 4, 4),
                          hidden_sizes=(16,)))
    res = dsprites_mig(model, n_histogram=400, n_sampling=600, n_samples=300)
    assert res["histogram"]["factor_names"] == ["shape", "scale", "orientation", "posX", "posY"]
    assert res["sampling"]["factor_names"] == ["scale", "orientation", "posX", "posY"]
    assert 0 <= res["histogram"]["mig_histogram"] <= 1 and 0 <= res["sampling"]["mig_sampling"] <= 1
    assert res["sampling"]["images"] == "uniform subsample of 600"
    with pytest.raises(InputError, match="1, 64, 64"):
        dsprites_mig(VAE(VAEConfig(latent_dim=2, hidden_sizes=(8,))))
