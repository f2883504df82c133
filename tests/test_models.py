"""Contract suite: every registered model family and architecture must pass these."""

import warnings

import pytest
import torch
from helpers import configured_trainer, rand_images

from vaekit.data import ImageDataset, ImageSplit
from vaekit.errors import ConfigError, InputError, ModelFormatError
from vaekit.models import (
    MODEL_REGISTRY,
    VAE,
    AAEConfig,
    CVAEConfig,
    PixelVAEConfig,
    TCVAEConfig,
    VAEConfig,
    VQVAEConfig,
    build_model,
    load_model,
)
from vaekit.nn.distributions import DiagonalGaussian
from vaekit.training import TrainConfig
from vaekit.training.monitors import MonitorConfig

_VQ_SMALL = {"hidden_channels": 16, "residual_channels": 8, "codebook_size": 16, "code_dim": 8, "prior_dim": 16,
             "prior_layers": 1, "prior_heads": 2}

VARIANTS = {
    "vae-mlp-bernoulli": VAEConfig(latent_dim=4, hidden_sizes=(32,)),
    "vae-mlp-2layer-tanh": VAEConfig(latent_dim=3, hidden_sizes=(32, 16), activation="tanh"),
    "vae-conv-bernoulli": VAEConfig(latent_dim=4, architecture="conv", conv_channels=(8, 16), hidden_sizes=(32,)),
    "vae-mlp-gaussian-fixed": VAEConfig(latent_dim=4, hidden_sizes=(32,), likelihood="gaussian", gaussian_sigma=0.3),
    "vae-conv-gaussian-learned": VAEConfig(latent_dim=4, architecture="conv", conv_channels=(8,),
                                           likelihood="gaussian", learn_sigma=True),
    "pixel-vae": PixelVAEConfig(latent_dim=4, conv_channels=(8,), encoder_hidden=(16,), decoder_hidden=(16,),
                                ar_kernel=5, ar_channels=8, ar_hidden=(8,)),
    "vae-mlp-iwae": VAEConfig(latent_dim=4, hidden_sizes=(32,), objective="iwae", iwae_k=3),
    "tcvae-mlp-mss": TCVAEConfig(latent_dim=4, hidden_sizes=(32,), dataset_size=1000),
    "tcvae-conv-mws": TCVAEConfig(latent_dim=4, architecture="conv", conv_channels=(8,), hidden_sizes=(16,),
                                  estimator="mws", dataset_size=1000),
    "cvae-mlp-class": CVAEConfig(latent_dim=4, hidden_sizes=(32,)),
    "cvae-conv-learned-prior-iwae": CVAEConfig(latent_dim=4, architecture="conv", conv_channels=(8,),
                                               hidden_sizes=(16,), learned_prior=True, objective="iwae", iwae_k=2),
    "cvae-mlp-vector-gaussian": CVAEConfig(latent_dim=3, hidden_sizes=(32,), condition="vector", cond_dim=3,
                                           likelihood="gaussian", learned_prior=True),
    "vqvae-ema-restart": VQVAEConfig(**_VQ_SMALL, dead_code_steps=1),
    "vqvae-loss-kmeans": VQVAEConfig(**_VQ_SMALL, codebook_update="loss", kmeans_init=True, kmeans_iters=2),
    "aae-mlp-mixture": AAEConfig(latent_dim=2, hidden_sizes=(32,), disc_hidden=(16,), prior="mixture"),
    "aae-conv-gaussian-normal": AAEConfig(latent_dim=4, architecture="conv", conv_channels=(8,), hidden_sizes=(16,),
                                          disc_hidden=(16,), encoder="gaussian", likelihood="gaussian"),
}
GAUSSIAN_FAMILIES = ("vae", "tcvae")  # unconditional q(z|x) = DiagonalGaussian with mean and logvar
ONE_PER_FAMILY = sorted({c.family: name for name, c in reversed(VARIANTS.items())}.values())


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_registered_family_has_a_variant():
    assert {c.family for c in VARIANTS.values()} >= set(MODEL_REGISTRY)


@pytest.fixture(params=sorted(VARIANTS))
def model(request):
    torch.manual_seed(0)
    return build_model(VARIANTS[request.param])


def _x(n=5):
    return rand_images(n)


def _y(model, n=5):
    """What the trainer passes as ``y`` to families that need it: labels, or condition vectors."""
    g = torch.Generator().manual_seed(2)
    if getattr(model.config, "condition", "class") == "vector":
        return torch.randn(n, model.config.cond_dim, generator=g)
    return torch.randint(10, (n,), generator=g)


def _kw(model, n=5):
    return {"y": _y(model, n)} if model.conditional else {}


def _sample(model, n):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "the VQ-VAE's code prior has not been trained")
        return model.sample(n)


def test_shapes_and_finite_loss(model):
    out = model(_x(), **_kw(model))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    for v in out.terms().values():
        assert v.ndim == 0 and torch.isfinite(v)
    assert _sample(model, 3).shape == (3, 1, 28, 28)
    assert model.reconstruct(_x(2)).shape == (2, 1, 28, 28)


def test_loss_terms_add_up(model):
    c = model.config
    if c.family not in ("vae", "cvae") or c.objective != "elbo":
        pytest.skip("the plain ELBO identity; other objectives are checked in their own test files")
    out = model(_x(), **_kw(model))
    assert torch.allclose(out.loss, out.recon + c.beta * out.kl)
    assert torch.allclose(out.kl, out.kl_per_dim.sum(), rtol=1e-5)
    assert torch.allclose(out.recon, out.recon_per_example.mean())


def _trained_params(model):
    opts = model.configure_optimizers(TrainConfig())
    return opts, {id(p) for o in opts.values() for g in o.param_groups for p in g["params"]}


def test_gradients_flow_to_every_trained_parameter(model):
    """Every parameter some optimizer trains gets a finite, non-zero gradient (or, for families with
    their own multi-phase step, is changed by one step)."""
    opts, trained = _trained_params(model)
    named = [(n, p) for n, p in model.named_parameters() if id(p) in trained]
    assert named, "no trained parameters"
    x = _x()
    if model.custom_train_step:
        before = {n: p.detach().clone() for n, p in named}
        model.train_step(model, x, _y(model), opts, {"check": True})
        for n, p in named:
            assert torch.isfinite(p).all() and not torch.equal(p, before[n]), f"one step does not change {n}"
        return
    model(x, **_kw(model)).loss.backward()
    for name, p in named:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_gradients_reach_mean_and_logvar_through_the_sample(model):
    if model.config.family not in GAUSSIAN_FAMILIES:
        pytest.skip("unconditional Gaussian-posterior families only")
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
    ref = model.state_dict()
    assert set(loaded.state_dict()) == set(ref)
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())
    x = _x()
    assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))
    kw = _kw(model)
    torch.manual_seed(7)
    a = model(x, **kw)
    torch.manual_seed(7)
    b = loaded(x, **kw)
    assert torch.equal(a.loss, b.loss)
    # saving again over an existing folder replaces it atomically
    model.save(tmp_path / "m")
    assert not (tmp_path / ".m.old").exists()


ENTRY_POINTS = ("forward", "encode", "reconstruct", "inspect")


def _call(model, entry, x):
    y = _y(model, len(x)) if model.conditional else None
    return model(x, y) if entry == "forward" else getattr(model, entry)(x, y)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_checks_its_input_the_same_way(model, entry):
    """One check (BaseModel.check_input) behind every entry point: type, dtype, shape, NaN/inf, range."""
    cases = [
        (torch.rand(2, 784), "shape"),
        (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), r"floating.*x.float\(\) / 255"),
        (torch.zeros(2, 1, 28, 28, dtype=torch.int64), "floating"),
        (torch.full((2, 1, 28, 28), 255.0), r"\[0, 1\].*divide by 255"),
        (torch.full((2, 1, 28, 28), -0.5), r"\[0, 1\]"),
        (torch.zeros(0, 1, 28, 28), "at least one example"),
    ]
    nan = torch.rand(2, 1, 28, 28)
    nan[1, 0, 3, 4] = float("nan")  # one bad pixel is enough
    inf = torch.rand(2, 1, 28, 28)
    inf[0, 0, 0, 0] = float("inf")
    cases += [(nan, "1 NaN or inf value"), (inf, "1 NaN or inf value")]
    for bad, match in cases:
        with pytest.raises(InputError, match=match):
            _call(model, entry, bad)
    with pytest.raises(InputError, match="torch.Tensor"):
        _call(model, entry, [[0.0]])


def test_float64_and_float16_inputs_are_converted_to_the_model_dtype(model):
    model.eval()
    x = _x(2)
    ref = model.reconstruct(x, _y(model, 2) if model.conditional else None)
    for dtype in (torch.float64, torch.float16):
        got = model.reconstruct(x.to(dtype), _y(model, 2) if model.conditional else None)
        assert got.dtype == torch.float32
        tol = 0 if dtype == torch.float64 else 1e-2
        assert torch.allclose(got, ref, atol=tol)


def test_bad_counts_and_latents_raise_clear_errors(model):
    with pytest.raises(InputError, match="positive integer"):
        model.sample(0)
    if model.discrete_latent:
        h, w = model.config.grid
        with pytest.raises(InputError, match="code indices"):
            model.decode(torch.full((1, h, w), 10**6))
        with pytest.raises(InputError, match="NaN or inf"):
            model.decode(torch.full((1, model.config.code_dim, h, w), float("nan")))
        return
    D = model.config.latent_dim
    with pytest.raises(InputError, match=f"shape \\(B, {D}\\)"):
        model.decode(torch.zeros(2, D + 1))
    with pytest.raises(InputError, match="NaN or inf"):
        model.decode(torch.full((2, D), float("nan")))
    with pytest.raises(InputError, match="floating"):
        model.decode(torch.zeros(2, D, dtype=torch.int64))


def test_one_interface_for_every_family(model):
    """encode/decode/sample/reconstruct/inspect take ``y`` everywhere; what comes back follows the declared
    capabilities (never probed)."""
    model.eval()
    x = _x(3)
    y = _y(model, 3) if model.conditional else None
    caps = model.capabilities()
    assert set(caps) == {"conditional", "gaussian_posterior", "defines_elbo", "discrete_latent", "has_prior_sampler"}
    code = model.encode(x, y)
    if model.discrete_latent:
        assert code.dtype == torch.int64 and code.shape == (3, *model.config.grid)
    else:
        assert code.mean.shape == (3, model.config.latent_dim)
        assert isinstance(code, DiagonalGaussian) == model.gaussian_posterior
    assert not (model.defines_elbo and not model.gaussian_posterior)  # an ELBO needs a posterior density
    lik = model.decode(code if model.discrete_latent else code.mean, y)
    assert lik.log_prob(x).shape == (3,) and lik.mean.shape == x.shape
    ins = model.inspect(x, y)
    assert torch.allclose(ins.reconstruction, model.reconstruct(x, y), atol=1e-6)
    assert torch.allclose(ins.recon_nats, -lik.log_prob(x), atol=1e-4)
    assert torch.allclose(ins.recon_mse, (x - ins.reconstruction).pow(2).mean((1, 2, 3)), atol=1e-6)
    assert ins.latent_norm.shape == (3,) and bool((ins.latent_norm >= 0).all())
    assert (ins.kl is not None) == model.defines_elbo and (ins.codes is not None) == model.discrete_latent
    if model.defines_elbo:
        assert bool((ins.kl >= -1e-5).all())
        if not getattr(model.config, "learned_prior", False):  # KL to N(0, I) in closed form
            assert torch.allclose(ins.kl, code.kl().sum(1), atol=1e-5)
    if not model.discrete_latent:
        assert torch.allclose(ins.latent_norm, code.mean.norm(dim=1), atol=1e-6)
    assert _sample_y(model, 2, y).shape == (2, 1, 28, 28)
    if model.has_prior_sampler:
        assert model.sample_prior(4).shape == (4, model.config.latent_dim)


def _sample_y(model, n, y):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "the VQ-VAE's code prior has not been trained")
        return model.sample(n, y[:n] if y is not None else None)


def test_a_conditional_model_uses_y_and_an_unconditional_one_ignores_it(model):
    model.eval()
    x = _x(3)
    y = _y(model, 3)
    if model.conditional:
        other = _y(model, 3).roll(1, 0) if not y.is_floating_point() else y + 1
        assert not torch.allclose(model.reconstruct(x, y), model.reconstruct(x, other))
    else:
        assert torch.equal(model.reconstruct(x, y), model.reconstruct(x))


def _synthetic_dataset(n_train=96, n_test=32):
    g = torch.Generator().manual_seed(3)
    split = lambda n: ImageSplit(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),  # noqa: E731
                                 torch.randint(10, (n,), generator=g))
    return ImageDataset("synthetic", split(n_train), split(n_test), tuple(map(str, range(10))))


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_trains_through_the_trainer_and_resumes(name, tmp_path):
    """The trainer's hooks (labels, named optimizers, custom steps, dataset size) work for each family,
    and a run stopped after 2 steps resumes to the end of its epoch with every optimizer restored."""
    cfg = VARIANTS[name]
    if cfg.family == "cvae" and cfg.condition == "vector":
        pytest.skip("the trainer serves class labels")
    data = _synthetic_dataset()
    tc = dict(epochs=1, batch_size=32, threads=1, progress=False, tensorboard="off", checkpoint_every=2)
    torch.manual_seed(0)
    off = MonitorConfig(enabled=False)  # random pixels: the collapse monitor would (rightly) warn
    r1 = configured_trainer(build_model(cfg), data, TrainConfig(**tc, max_steps=2), run_dir=tmp_path, monitor=off).fit()
    assert r1.steps == 2
    torch.manual_seed(0)
    r2 = configured_trainer(build_model(cfg), data, TrainConfig(**tc), run_dir=tmp_path, monitor=off).fit()
    assert r2.resumed_from and r2.steps == 3 and r2.final_eval is not None
    assert all(v == v for k, v in r2.final_eval.items() if isinstance(v, float)), r2.final_eval
    assert type(load_model(r2.model_dir)).family == cfg.family


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


@pytest.mark.parametrize("family", sorted(MODEL_REGISTRY))
def test_each_family_builds_its_default_and_rejects_another_config_type(family):
    cls = MODEL_REGISTRY[family]
    assert isinstance(cls.resolve_config(None), cls.config_class)
    other = next(c for f, c in MODEL_REGISTRY.items() if c.config_class is not cls.config_class)
    with pytest.raises(ConfigError, match=f"{cls.__name__} needs a config of type {cls.config_class.__name__}"):
        cls(other.config_class())


def test_check_class_labels_names_the_problem():
    from vaekit.models.base import check_class_labels

    assert check_class_labels(torch.tensor([0, 2], dtype=torch.uint8), 3).dtype == torch.int64
    for bad, msg in ((torch.tensor([0.0, 1.0]), "integer tensor"), ([0, 1], "integer tensor"),
                     (torch.tensor([[0, 1]]), r"shape \(B,\)"),
                     (torch.tensor([0, 3]), r"\[0, 3\), got values in \[0, 3\]")):
        with pytest.raises(InputError, match=msg):
            check_class_labels(bad, 3)
    with pytest.raises(InputError, match=r"shape \(4,\)"):
        check_class_labels(torch.tensor([0, 1]), 3, n=4)


def test_device_and_dtype_follow_to_reassigned_parameters_and_new_submodules():
    # BaseModel remembers where its first parameter lives instead of walking the modules each call
    model = VAE(VAEConfig(latent_dim=2, hidden_sizes=(8,)))
    assert model.dtype == torch.float32 and model.device == torch.device("cpu")
    model.to(torch.float64)
    assert model.dtype == torch.float64
    first = next(model.parameters())
    owner = next(m for m in model.modules() if any(p is first for p in m._parameters.values()))
    key = next(k for k, p in owner._parameters.items() if p is first)
    setattr(owner, key, torch.nn.Parameter(first.detach().half()))
    assert model.dtype == torch.float16
    model.encoder = torch.nn.Sequential(torch.nn.Linear(784, 8).to(torch.bfloat16))
    assert model.dtype == next(model.parameters()).dtype == torch.bfloat16
