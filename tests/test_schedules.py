"""KL schedules and free bits against their published formulas."""

import math

import pytest
import torch

from vaekit.errors import ConfigError
from vaekit.objectives.kl_control import KLControl, kl_term
from vaekit.training.schedules import KLConfig, KLSchedule, capacity, cyclical, linear_warmup


def test_linear_warmup():
    s = KLSchedule(KLConfig(schedule="linear", warmup_steps=100), beta=2.0, total_steps=1000, steps_per_epoch=10)
    assert [s.weight(t) for t in (0, 25, 50, 100, 500)] == [0.0, 0.5, 1.0, 2.0, 2.0]
    by_epochs = KLSchedule(KLConfig(schedule="linear", warmup_epochs=2.5), 1.0, 1000, steps_per_epoch=40)
    assert by_epochs.warmup == 100 and by_epochs.weight(50) == 0.5


@pytest.mark.parametrize("shape", ["linear", "sigmoid", "cosine"])
def test_cyclical_matches_fu_et_al(shape):
    # T = 1000 steps, M = 4 cycles (period 250), R = 0.5: rising over 125 steps, flat for 125
    cfg = KLConfig(schedule="cyclical", cycles=4, cycle_ratio=0.5, cycle_shape=shape)
    s = KLSchedule(cfg, beta=1.0, total_steps=1000, steps_per_epoch=10)
    rise = {"linear": lambda x: x, "sigmoid": lambda x: 1 / (1 + math.exp(-(12 * x - 6))),
            "cosine": lambda x: 0.5 - 0.5 * math.cos(math.pi * x)}[shape]
    for step in (0, 30, 62, 100, 124, 250, 280, 500, 600):
        tau = (step % 250) / 250
        expected = rise(tau / 0.5) if tau < 0.5 else 1.0
        assert s.weight(step) == pytest.approx(expected), step
    for step in (125, 200, 249, 375, 999):
        assert s.weight(step) == 1.0
    assert s.weight(250) == pytest.approx(rise(0.0))  # a new cycle starts from the bottom
    assert cyclical(62, 3.0, 1000, 4, 0.5, "linear") == pytest.approx(3.0 * 62 / 125)


def test_capacity_annealing():
    cfg = KLConfig(schedule="capacity", capacity_max=25.0, capacity_steps=1000, capacity_gamma=100.0)
    s = KLSchedule(cfg, beta=1.0, total_steps=5000, steps_per_epoch=10)
    assert [s.capacity(t) for t in (0, 400, 1000, 3000)] == [0.0, 10.0, 25.0, 25.0]
    assert capacity(250, 20.0, 1000) == 5.0
    # the loss term is gamma * |KL - C|
    kl = torch.tensor([3.0, 4.0])  # total 7
    term, _ = kl_term(kl, KLControl(capacity=10.0, gamma=100.0))
    assert term.item() == pytest.approx(300.0)


def test_schedule_restart_offset():
    s = KLSchedule(KLConfig(schedule="linear", warmup_steps=100), 1.0, 1000, 10, offset=300)
    assert s.weight(300) == 0.0 and s.weight(350) == 0.5 and s.weight(299) == 0.0
    assert linear_warmup(10, 1.0, 0) == 1.0


def test_free_bits_give_zero_gradient_below_lambda():
    kl = torch.tensor([0.1, 0.4, 0.9, 2.0], requires_grad=True)  # batch-mean KL per dimension
    term, used = kl_term(kl, KLControl(free_bits=0.5))
    term.backward()
    assert kl.grad.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert used.item() == pytest.approx(0.5 + 0.5 + 0.9 + 2.0)


def test_free_bits_in_a_model_stop_the_kl_gradient_of_a_quiet_dimension():
    from vaekit.models import VAE, VAEConfig

    torch.manual_seed(0)
    m = VAE(VAEConfig(latent_dim=3, hidden_sizes=(16,)))
    x = torch.rand(8, 1, 28, 28)
    q = m.encode(x)
    mean = q.mean.detach().requires_grad_(True)
    logvar = q.logvar.detach().requires_grad_(True)
    kl_pd = (0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar)).mean(0)
    lam = float(kl_pd[0].detach()) + 1.0  # dimension 0 is under lambda, the others may not be
    term, _ = kl_term(kl_pd, KLControl(free_bits=lam))
    term.backward()
    assert torch.all(mean.grad[:, 0] == 0) and torch.all(logvar.grad[:, 0] == 0)


def test_total_floor_and_true_kl_are_reported():
    from vaekit.models import VAE, VAEConfig

    torch.manual_seed(0)
    m = VAE(VAEConfig(latent_dim=3, hidden_sizes=(16,)))
    out = m(torch.rand(4, 1, 28, 28), kl_control=KLControl(kl_floor=1e6))
    assert out.kl_used.item() == 1e6 and out.kl.item() < 1e3  # true KL beside the floored one
    assert torch.allclose(out.loss, out.recon + 1e6)


def test_bad_schedule_settings():
    with pytest.raises(ConfigError, match="warmup"):
        KLConfig(schedule="linear")
    with pytest.raises(ConfigError, match="cycle_ratio"):
        KLConfig(schedule="cyclical", cycle_ratio=0.0)
    with pytest.raises(ConfigError, match="kl.schedule"):
        KLConfig(schedule="exponential")
