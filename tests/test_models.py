"""Contract suite: every registered model family and architecture must pass these."""

import pytest
import torch

from vaekit.errors import InputError, ModelFormatError
from vaekit.models import MODEL_REGISTRY, VAE, PixelVAEConfig, VAEConfig, build_model, load_model

VARIANTS = {
    "vae-mlp-bernoulli": VAEConfig(latent_dim=4, hidden_sizes=(32,)),
    "vae-mlp-2layer-tanh": VAEConfig(latent_dim=3, hidden_sizes=(32, 16), activation="tanh"),
    "vae-conv-bernoulli": VAEConfig(latent_dim=4, architecture="conv", conv_channels=(8, 16), hidden_sizes=(32,)),
    "vae-mlp-gaussian-fixed": VAEConfig(latent_dim=4, hidden_sizes=(32,), likelihood="gaussian", gaussian_sigma=0.3),
    "vae-conv-gaussian-learned": VAEConfig(latent_dim=4, architecture="conv", conv_channels=(8,),
                                           likelihood="gaussian", learn_sigma=True),
    "pixel-vae": PixelVAEConfig(latent_dim=4, conv_channels=(8,), encoder_hidden=(16,), decoder_hidden=(16,),
                                ar_kernel=5, ar_channels=8, ar_hidden=(8,)),
}


def test_every_registered_family_has_a_variant():
    assert {c.family for c in VARIANTS.values()} >= set(MODEL_REGISTRY)


@pytest.fixture(params=sorted(VARIANTS))
def model(request):
    torch.manual_seed(0)
    return build_model(VARIANTS[request.param])


def _x(n=5):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_shapes_and_finite_loss(model):
    out = model(_x())
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    for v in out.terms().values():
        assert v.ndim == 0 and torch.isfinite(v)
    assert model.sample(3).shape == (3, 1, 28, 28)
    assert model.reconstruct(_x(2)).shape == (2, 1, 28, 28)


def test_loss_terms_add_up(model):
    out = model(_x())
    assert torch.allclose(out.loss, out.recon + model.config.beta * out.kl)
    assert torch.allclose(out.kl, out.kl_per_dim.sum(), rtol=1e-5)
    assert torch.allclose(out.recon, out.recon_per_example.mean())


def test_gradients_flow_to_every_parameter(model):
    model(_x()).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_gradients_reach_mean_and_logvar_through_the_sample(model):
    q = model.encode(_x())
    mean = q.mean.detach().requires_grad_(True)
    logvar = q.logvar.detach().requires_grad_(True)
    from vaekit.nn import DiagonalGaussian

    z = DiagonalGaussian(mean, logvar).rsample()
    recon = -model.decode(z).log_prob(_x()).sum()  # reconstruction only: no KL path to mean/logvar
    recon.backward()
    assert mean.grad is not None and mean.grad.abs().sum() > 0
    assert logvar.grad is not None and logvar.grad.abs().sum() > 0


def test_save_load_round_trip_is_identical(model, tmp_path):
    model.eval()
    path = model.save(tmp_path / "m", metadata={"note": "x"})
    loaded = load_model(path)
    assert type(loaded) is type(model) and loaded.config == model.config
    x = _x()
    assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))
    torch.manual_seed(7)
    a = model(x)
    torch.manual_seed(7)
    b = loaded(x)
    assert torch.equal(a.loss, b.loss)
    # saving again over an existing folder replaces it atomically
    model.save(tmp_path / "m")
    assert not (tmp_path / ".m.old").exists()


def test_bad_input_raises_clear_errors(model):
    with pytest.raises(InputError, match="shape"):
        model(torch.rand(2, 784))
    with pytest.raises(InputError, match="floating"):
        model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(InputError, match="torch.Tensor"):
        model([[0.0]])
    with pytest.raises(InputError, match="positive integer"):
        model.sample(0)


def test_bernoulli_rejects_targets_outside_unit_interval():
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        VAE(VAEConfig(latent_dim=2, hidden_sizes=(8,)))(torch.full((2, 1, 28, 28), 255.0))


def test_loading_a_non_model_folder_fails(tmp_path):
    with pytest.raises(ModelFormatError):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"format": "other"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="format"):
        load_model(tmp_path)


def test_batched_equals_per_example():
    torch.manual_seed(0)
    m = VAE(VAEConfig(latent_dim=4, hidden_sizes=(32,))).eval()
    x = _x(4)
    q = m.encode(x)
    z = q.mean
    batched = m.decode(z).log_prob(x)
    single = torch.stack([m.decode(z[i : i + 1]).log_prob(x[i : i + 1])[0] for i in range(4)])
    assert torch.allclose(batched, single, atol=1e-4)
