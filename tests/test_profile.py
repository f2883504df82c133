"""The monitoring reference profile: its figures against independent computations, every family,
storage inside the artifact (a flipped byte is caught)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vaekit.artifact import read_artifact
from vaekit.errors import ArtifactError, ArtifactIntegrityError, InputError
from vaekit.models import (
    AAEConfig,
    CVAEConfig,
    PixelVAEConfig,
    TCVAEConfig,
    VAEConfig,
    VQVAEConfig,
    build_model,
    load_model,
)
from vaekit.registry.profile import ARRAYS, PER_EXAMPLE, Profile, attach_profile, compute_profile, read_profile

pytestmark = pytest.mark.usefixtures("one_thread")

_VQ = {"hidden_channels": 16, "residual_channels": 8, "codebook_size": 16, "code_dim": 8, "prior_dim": 16,
       "prior_layers": 1, "prior_heads": 2}
FAMILIES = {
    "vae": VAEConfig(latent_dim=4, hidden_sizes=(32,)),
    "vae-gaussian": VAEConfig(latent_dim=4, hidden_sizes=(32,), likelihood="gaussian", gaussian_sigma=0.3),
    "tcvae": TCVAEConfig(latent_dim=4, hidden_sizes=(32,), dataset_size=1000),
    "pixel_vae": PixelVAEConfig(latent_dim=4, conv_channels=(8,), encoder_hidden=(16,), decoder_hidden=(16,),
                                ar_kernel=5, ar_channels=8, ar_hidden=(8,)),
    "cvae": CVAEConfig(latent_dim=4, hidden_sizes=(32,)),
    "vqvae": VQVAEConfig(**_VQ),
    "aae-point": AAEConfig(latent_dim=2, hidden_sizes=(32,), disc_hidden=(16,), prior="mixture"),
    "aae-gaussian": AAEConfig(latent_dim=4, hidden_sizes=(16,), disc_hidden=(16,), encoder="gaussian"),
}


@pytest.fixture(scope="module")
def held_out(mnist):
    """200 MNIST test images (never the train split) and their labels."""
    return mnist.test.images[:200].float() / 255, mnist.test.labels[:200]


def _model(name: str):
    torch.manual_seed(0)
    return build_model(FAMILIES[name]).eval()


def _profile(model, held_out, **kw) -> Profile:
    x, y = held_out
    return compute_profile(model, x, y, source="mnist test[:200]", sample_size=kw.pop("sample_size", 150),
                           latency_runs=5, latency_warmup=1, **kw)


def test_quantiles_and_per_example_errors_match_independent_numpy(held_out):
    model = _model("vae")
    prof = _profile(model, held_out, batch_size=64)  # batches of 64: the batching must not change anything
    x, _ = held_out
    with torch.no_grad():
        q = model.encode(x)
        mse = ((model.reconstruct(x) - x) ** 2).numpy().reshape(len(x), -1).mean(1)
        probs = torch.sigmoid(model.decode(q.mean).logits).double().numpy().reshape(len(x), -1)
        mu, logvar = q.mean.double().numpy(), q.logvar.double().numpy()
    xs = x.double().numpy().reshape(len(x), -1)
    eps = 1e-300
    nll = -(xs * np.log(probs + eps) + (1 - xs) * np.log(1 - probs + eps)).sum(1)  # Bernoulli, by hand
    kl = 0.5 * (mu**2 + np.exp(logvar) - logvar - 1).sum(1)
    for name, ref in (("recon_mse", mse), ("recon_nll", nll), ("kl", kl), ("mean_norm", np.linalg.norm(mu, axis=1)),
                      ("pixel_mean", xs.mean(1)), ("pixel_var", xs.var(1))):
        got = prof.arrays[name].numpy()
        assert np.allclose(got, ref, rtol=1e-4, atol=1e-5), name
        levels = np.quantile(got, [0.5, 0.9, 0.95, 0.99, 0.999])
        assert list(prof.quantiles[name].values()) == pytest.approx(levels, rel=1e-12, abs=1e-12), name
        assert list(prof.quantiles[name]) == ["p50", "p90", "p95", "p99", "p99.9"]
        assert prof.summary[name]["mean"] == pytest.approx(got.mean()) and prof.summary[name]["max"] == got.max()
    hist, _ = np.histogram(xs, bins=32, range=(0.0, 1.0))
    assert np.allclose(prof.arrays["intensity_hist"].numpy(), hist / hist.sum())
    assert prof.arrays["intensity_hist"].sum().item() == pytest.approx(1.0)


def test_aggregated_posterior_matches_an_independent_computation(held_out):
    model = _model("vae")
    prof = _profile(model, held_out)
    x, _ = held_out
    with torch.no_grad():
        q = model.encode(x)
    mu, var = q.mean.double().numpy(), q.logvar.double().exp().numpy()
    # exact: the mixture's second moment minus its squared mean
    second = (mu**2 + var).mean(0)
    assert np.allclose(prof.arrays["agg_mean"].numpy(), mu.mean(0))
    assert np.allclose(prof.arrays["agg_var"].numpy(), second - mu.mean(0) ** 2, rtol=1e-9)
    # Monte Carlo from q(z) itself: pick an image uniformly, draw z ~ q(z|x)
    rng = np.random.default_rng(0)
    pick = rng.integers(0, len(x), 400_000)
    z = mu[pick] + np.sqrt(var[pick]) * rng.standard_normal((len(pick), mu.shape[1]))
    assert np.allclose(prof.arrays["agg_var"].numpy(), z.var(0), rtol=0.02)
    kl_dims = 0.5 * (mu**2 + var - np.log(var) - 1)
    assert np.allclose(prof.arrays["kl_per_dim"].numpy(), kl_dims.mean(0), rtol=1e-5)
    # the reference sample holds the posterior means of the indexed examples
    idx = prof.arrays["ref_index"].numpy()
    assert len(idx) == 150 == len(set(idx.tolist())) and prof.arrays["ref_means"].shape == (150, 4)
    assert np.allclose(prof.arrays["ref_means"].numpy(), mu[idx], atol=1e-6)
    assert _profile(model, held_out, sample_size=5000).arrays["ref_means"].shape == (200, 4)  # capped at N


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_gets_a_profile_that_says_what_is_absent(name, held_out, tmp_path):
    model = _model(name)
    prof = _profile(model, held_out)
    assert set(prof.arrays) | set(prof.absent) == set(ARRAYS) and not set(prof.arrays) & set(prof.absent)
    assert all(reason for reason in prof.absent.values())
    for k in ("recon_mse", "recon_nll", "pixel_mean", "pixel_var", "intensity_hist"):
        assert prof.has(k)
    assert all(torch.isfinite(prof.arrays[k]).all() for k in PER_EXAMPLE if prof.has(k))
    if model.discrete_latent:
        assert prof.has("code_counts") and prof.arrays["code_counts"].sum() == 200 * np.prod(model.config.grid)
        assert 0 < prof.codes["code_usage"] <= 1 and 1 <= prof.codes["code_perplexity"] <= 16
        assert not prof.has("kl") and "discrete" in prof.absent["ref_means"]
    else:
        assert prof.arrays["ref_means"].shape == (150, model.config.latent_dim)
        assert prof.has("kl") == bool(model.gaussian_posterior)
    assert prof.info["family"] == model.family and prof.info["n"] == 200 and prof.info["source"]
    assert 0 < prof.latency_ms["p50"] <= prof.latency_ms["p99"]
    folder = attach_profile(model.save(tmp_path / "m"), prof)
    back = read_profile(folder)
    assert back.quantiles == prof.quantiles and back.absent == prof.absent and back.info == prof.info
    assert set(back.arrays) == set(prof.arrays) and all(torch.equal(back.arrays[k], v) for k, v in prof.arrays.items())
    loaded = load_model(folder)  # the profile rides along: the model still loads
    assert type(loaded) is type(model)


@pytest.mark.parametrize("file", ["profile/profile.json", "profile/profile.safetensors"])
def test_a_flipped_byte_in_the_profile_is_caught(file, held_out, tmp_path):
    model = _model("vae")
    folder = attach_profile(model.save(tmp_path / "m"), _profile(model, held_out))
    path = folder / file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError) as info:
        read_profile(folder)
    assert info.value.file == file and file in str(info.value)
    with pytest.raises(ArtifactIntegrityError):
        load_model(folder)  # the whole artifact is refused, not only its profile


def test_storage_errors(held_out, tmp_path):
    model = _model("vae")
    prof = _profile(model, held_out)
    plain = model.save(tmp_path / "m")
    with pytest.raises(ArtifactError, match="no reference profile"):
        read_profile(plain)
    other = _model("aae-point").save(tmp_path / "aae")
    with pytest.raises(ArtifactError, match="'aae' model; the profile was computed for 'vae'"):
        attach_profile(other, prof)
    copy = attach_profile(plain, prof, dst=tmp_path / "copy")  # the registry writes into its own store
    assert read_profile(copy).info["n"] == 200 and not read_artifact(plain).files.count("profile/profile.json")


def test_bad_inputs_are_refused(held_out):
    x, y = held_out
    vae, cvae = _model("vae"), _model("cvae")
    with pytest.raises(InputError, match="needs labels"):
        compute_profile(cvae, x)
    with pytest.raises(InputError, match="one row per image"):
        compute_profile(cvae, x, y[:10])
    with pytest.raises(InputError):
        compute_profile(vae, (x * 255).to(torch.uint8))
    with pytest.raises(InputError, match="at least 2"):
        compute_profile(vae, x[:1])
    with pytest.raises(InputError, match="images must be"):
        compute_profile(vae, x.numpy())
    for kw in ({"sample_size": 0}, {"batch_size": 1.5}, {"latency_runs": True}, {"source": 3}):
        with pytest.raises(InputError):
            compute_profile(vae, x, **kw)
    vae.train()
    _profile(vae, held_out)
    assert vae.training  # the caller's mode is restored
    with torch.no_grad():
        list(vae.parameters())[-1][0] = float("nan")  # one poisoned weight
    with pytest.raises(InputError, match="non-finite [a-z_]+ for 200 of the 200 held-out"):
        compute_profile(vae, x)


@pytest.mark.parametrize("name", ["vae", "vqvae"])
def test_the_profile_stores_fitted_anomaly_detectors_the_service_can_read(name, held_out, tmp_path):
    """The p99 thresholds and the scores they belong to travel with the profile (issue 14)."""
    model = _model(name)
    prof = _profile(model, held_out)
    folder = attach_profile(model.save(tmp_path / "m"), prof)
    back = read_profile(folder)
    assert back.detectors == prof.detectors and "mse" in back.detectors
    det = back.detector("mse", load_model(folder))
    x = held_out[0]
    assert det.threshold_ == pytest.approx(prof.detectors["mse"]["threshold"])
    assert 0 < float(det.predict(x).double().mean()) < 0.1  # about 1% of the calibration images are over p99
    if model.defines_elbo:
        assert "ensemble" in back.detectors
    else:  # the VQ-VAE has no ELBO: the ensemble is absent, with the reason
        assert "ensemble" not in back.detectors and back.info["detectors_absent"]["ensemble"]
        with pytest.raises(ArtifactError, match="no 'ensemble' detector"):
            back.detector("ensemble", model)
