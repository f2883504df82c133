"""Adversarial autoencoder: priors, the phases of a step, monitors, and the MMD used to judge it."""

import math

import pytest
import torch
from helpers import rand_images

from vaekit.errors import ConfigError, InputError
from vaekit.models import AAE, AAEConfig
from vaekit.models.aae import mixture_means, sample_diversity
from vaekit.objectives.mmd import median_bandwidth, mmd_rbf
from vaekit.training import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(n=8):
    return rand_images(n)


def _model(**kw):
    torch.manual_seed(0)
    return AAE(AAEConfig(**{"latent_dim": 2, "hidden_sizes": (32,), "disc_hidden": (16,), **kw}))


def test_mixture_prior_has_its_components_on_a_circle():
    means = mixture_means(10, 4.0, 3)
    assert torch.allclose(means[:, :2].norm(dim=1), torch.full((10,), 4.0)) and (means[:, 2] == 0).all()
    assert torch.allclose(means[3, :2], 4.0 * torch.tensor([math.cos(0.6 * math.pi), math.sin(0.6 * math.pi)]))
    m = _model(prior="mixture", mixture_std=0.2)
    z, comp = m.sample_prior(20000, torch.Generator().manual_seed(0), return_components=True)
    for k in range(10):
        zk = z[comp == k]
        assert torch.allclose(zk.mean(0), means[k, :2], atol=0.02) and torch.allclose(zk.std(0), torch.full((2,), 0.2),
                                                                                    atol=0.02)
    with pytest.raises(ConfigError, match="latent_dim >= 2"):
        AAEConfig(latent_dim=1, prior="mixture")


def test_custom_prior_sampler():
    m = _model(prior="custom")
    with pytest.raises(InputError, match="set_prior_sampler"):
        m.sample(2)
    m.set_prior_sampler(lambda n: torch.full((n, 2), 3.0))
    assert torch.equal(m.sample_prior(4), torch.full((4, 2), 3.0))
    m.set_prior_sampler(lambda n: torch.zeros(n, 5))
    with pytest.raises(InputError, match=r"\(4, 2\)"):
        m.sample_prior(4)
    with pytest.raises(InputError, match="callable"):
        m.set_prior_sampler(3)


def test_optimizers_follow_the_two_time_scale_rule_and_split_the_parameters():
    m = _model(encoder="gaussian")
    opts = m.configure_optimizers(TrainConfig(lr=1e-3))
    assert {k: o.param_groups[0]["lr"] for k, o in opts.items()} == {
        "autoencoder": 2e-4, "generator": 2e-4, "discriminator": 1e-4}
    ids = {k: {id(p) for p in o.param_groups[0]["params"]} for k, o in opts.items()}
    enc = {id(p) for p in m.encoder_parameters()}
    dec = {id(p) for p in m.decoder.parameters()}
    disc = {id(p) for p in m.discriminator.parameters()}
    assert ids["autoencoder"] == enc | dec and ids["generator"] == enc and ids["discriminator"] == disc
    assert id(m.to_logvar.weight) in enc


def test_each_phase_moves_only_its_own_parameters(monkeypatch):
    """Record which parameters each optimizer step changes during one train_step."""
    m = _model()
    opts = m.configure_optimizers(TrainConfig())
    names = {id(p): n for n, p in m.named_parameters()}
    changed = {}
    for key, opt in opts.items():
        orig = opt.step

        def step(*a, _orig=orig, _key=key, **kw):
            before = {n: p.detach().clone() for n, p in m.named_parameters()}
            out = _orig(*a, **kw)
            changed[_key] = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
            return out

        monkeypatch.setattr(opt, "step", step)
    out = m.train_step(m, _x(), None, opts, {"check": True})
    enc = {names[id(p)] for p in m.encoder_parameters()}
    dec = {n for n, _ in m.decoder.named_parameters(prefix="decoder")}
    disc = {n for n, _ in m.discriminator.named_parameters(prefix="discriminator")}
    assert changed == {"autoencoder": enc | dec, "discriminator": disc, "generator": enc}
    assert set(out.terms()) == {"loss", "recon", "disc_loss", "gen_loss", "disc_accuracy", "active_units",
                                "sample_diversity"}
    assert all(p.requires_grad for p in m.discriminator.parameters())


def test_discriminator_learns_to_separate_codes_from_a_distant_prior():
    m = _model(prior="custom", disc_lr=3e-3, diversity_samples=2)
    m.set_prior_sampler(lambda n: torch.randn(n, 2) + 6.0)  # far from the encoder's initial codes
    opts = m.configure_optimizers(TrainConfig())
    opts["generator"].param_groups[0]["lr"] = 0.0  # hold the encoder still: only the discriminator learns
    opts["autoencoder"].param_groups[0]["lr"] = 0.0
    start = float(m(_x(32)).disc_loss.detach())
    accs = [float(m.train_step(m, _x(32), None, opts, {}).disc_accuracy) for _ in range(60)]
    assert accs[-1] > 0.95 and float(m(_x(32)).disc_loss.detach()) < 0.5 * start


def test_monitors():
    a = torch.zeros(3, 1, 2, 2)
    assert float(sample_diversity(a)) == 0.0
    b = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    assert float(sample_diversity(b)) == pytest.approx(1.0)
    m = _model(latent_dim=3, prior="normal").eval()
    out = m(_x())
    assert 0 <= float(out.active_units) <= 3 and float(out.sample_diversity) > 0
    assert torch.allclose(out.loss, out.recon + out.gen_loss)


# -- MMD ---------------------------------------------------------------------------------------------
def test_mmd_matches_a_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    s = (0.7, 1.5)

    def k(a, b):
        return sum(math.exp(-float(((a - b) ** 2).sum()) / (2 * w * w)) for w in s)

    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(x[i], y[j]) for i in range(6) for j in range(5)) / 30
    assert mmd_rbf(x, y, s) == pytest.approx(xx + yy - 2 * xy, abs=1e-12)
    pooled = torch.cat([x, y])
    d = [float((pooled[i] - pooled[j]).norm()) for i in range(11) for j in range(i + 1, 11)]
    assert median_bandwidth(x, y) == pytest.approx(float(torch.tensor(d, dtype=torch.float64).median()))


def test_mmd_separates_different_distributions():
    g = torch.Generator().manual_seed(1)
    same = mmd_rbf(torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g))
    shifted = mmd_rbf(torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g) + 1.0)
    assert abs(same) < 0.02 and shifted > 0.2
    with pytest.raises(InputError, match="same dimension"):
        mmd_rbf(torch.randn(4, 2), torch.randn(4, 3))
    with pytest.raises(InputError, match="bandwidths"):
        mmd_rbf(torch.randn(4, 2), torch.randn(4, 2), bandwidths=(0.0,))


def _ddp_worker(rank, world, init_file, x, out_dir):
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    m = _model()
    opts = m.configure_optimizers(TrainConfig())
    torch.manual_seed(10 + rank)  # different prior samples on each rank, as under torchrun
    for _ in range(2):
        m.train_step(m, x[rank::world], None, opts, {})
    torch.save(m.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_phases_average_gradients_so_ranks_stay_identical(tmp_path):
    """Two gloo processes with different data and prior samples: after two steps both hold the same
    weights, and those differ from the start (the phases all-reduce their gradients)."""
    import torch.multiprocessing as mp

    x = _x(16)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), x, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    start = _model().state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert not torch.equal(a["discriminator.1.weight"], start["discriminator.1.weight"])


def test_gen_lr_sets_the_generator_phase_rate_only():
    opts = _model(gen_lr=5e-5).configure_optimizers(TrainConfig())
    assert {k: o.param_groups[0]["lr"] for k, o in opts.items()} == {
        "autoencoder": 2e-4, "generator": 5e-5, "discriminator": 1e-4}
    with pytest.raises(ConfigError, match="gen_lr"):
        AAEConfig(gen_lr=0.0)


def test_label_guided_config_and_label_checks():
    with pytest.raises(ConfigError, match="label_guided needs model.prior 'mixture'"):
        AAEConfig(label_guided=True, prior="normal")
    m = _model(prior="mixture", label_guided=True, diversity_samples=2)
    assert m.uses_labels and not m.conditional  # labels shape the regularization, not the encoder
    assert m.discriminator[0][0].in_features == 2 + 10  # code + one-hot component/class
    with pytest.raises(InputError, match="needs integer class labels y of shape"):
        m(_x(4))
    with pytest.raises(InputError, match=r"must lie in \[0, 10\)"):
        m(_x(4), y=torch.tensor([0, 1, 2, 10]))


def test_label_guided_discriminator_reads_the_label():
    # codes that sit exactly on component 0: plain regularization cannot tell them from prior draws
    # of component 0, but the label-guided critic learns that a code labelled 5 belongs at component 5
    m = _model(prior="mixture", label_guided=True, mixture_std=0.1, disc_lr=3e-3, diversity_samples=2)
    g = torch.Generator().manual_seed(0)
    z_fake = m.mixture_means[0] + 0.1 * torch.randn(256, 2, generator=g)
    y_fake = torch.full((256,), 5)
    opt = torch.optim.Adam(m.discriminator.parameters(), lr=3e-3)
    for _ in range(150):
        z_real, y_real = m.sample_prior(256, g, return_components=True)
        opt.zero_grad()
        loss, acc = m._disc_terms(z_fake, z_real, y_fake, y_real)
        loss.backward()
        opt.step()
    assert float(acc) > 0.9
    with torch.no_grad():  # the same codes labelled 0 look like prior draws of component 0
        right = torch.sigmoid(m._critic(z_fake, torch.zeros(256, dtype=torch.long))).mean()
        wrong = torch.sigmoid(m._critic(z_fake, y_fake)).mean()
    assert right > 0.5 > wrong


def test_trainer_passes_labels_to_a_label_guided_aae(tmp_path, mnist_small):
    from vaekit.training import Trainer

    m = _model(prior="mixture", label_guided=True, diversity_samples=2)
    cfg = TrainConfig(epochs=1, max_steps=5, batch_size=32, progress=False, tensorboard="off", checkpoint_every=0,
                      threads=1)
    res = Trainer(m, mnist_small, cfg, run_dir=tmp_path / "run").fit()
    assert res.steps == 5 and res.final_eval is not None and math.isfinite(res.final_eval["disc_loss"])


def test_r1_penalty_matches_finite_differences():
    m = _model(prior="mixture", disc_r1=2.0, diversity_samples=2).double()
    g = torch.Generator().manual_seed(3)
    z_real = torch.randn(16, 2, generator=g, dtype=torch.float64) * 3
    z_fake = torch.randn(16, 2, generator=g, dtype=torch.float64)
    plain, _ = m._disc_terms(z_fake, z_real)
    with_r1, _ = m._disc_terms(z_fake, z_real, r1=2.0)
    h, sq = 1e-5, torch.zeros(16, dtype=torch.float64)
    with torch.no_grad():
        for d in range(2):
            e = torch.zeros(2, dtype=torch.float64)
            e[d] = h
            sq += ((m._critic(z_real + e, None) - m._critic(z_real - e, None)) / (2 * h)) ** 2
    assert torch.allclose(with_r1 - plain, 0.5 * 2.0 * sq.mean(), rtol=1e-6)
    with pytest.raises(ConfigError, match="disc_r1"):
        AAEConfig(disc_r1=-1.0)
