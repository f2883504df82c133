"""Conditional VAE: the condition, its dropout, the learned prior, conditional sampling."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import rand_images

from vaekit.errors import ConfigError, InputError
from vaekit.models import CVAE, CVAEConfig
from vaekit.objectives.kl import kl_normal

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(n=6):
    return rand_images(n)


def _model(**kw):
    torch.manual_seed(0)
    return CVAE(CVAEConfig(latent_dim=3, hidden_sizes=(16,), **kw))


def test_condition_vector_from_labels_and_vectors():
    m = _model()
    y = torch.tensor([0, 3, 9])
    assert torch.equal(m.condition_vector(y), F.one_hot(y, 10).float())
    soft = torch.full((2, 10), 0.1)
    assert torch.equal(m.condition_vector(soft), soft)
    with pytest.raises(InputError, match=r"\[0, 10\)"):
        m.condition_vector(torch.tensor([10]))
    with pytest.raises(InputError, match=r"\(B, 10\)"):
        m.condition_vector(torch.zeros(2, 4))
    with pytest.raises(InputError, match="rows"):
        m(_x(6), torch.arange(5))
    with pytest.raises(InputError, match="needs the condition"):
        m(_x())
    v = _model(condition="vector", cond_dim=2)
    with pytest.raises(InputError, match="float vectors"):
        v(_x(), torch.arange(6))
    assert torch.isfinite(v(_x(), torch.randn(6, 2)).loss)


def test_condition_dropout_rate_and_eval_mode():
    m = _model(cond_dropout=0.3)
    c = torch.ones(20000, 10)
    dropped = (m.drop_condition(c).sum(1) == 0).float().mean().item()
    assert abs(dropped - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 20000)
    m.eval()
    assert torch.equal(m.drop_condition(c), c)
    # the forward pass uses it: in eval mode the loss is deterministic given the noise, in training it is not
    x, y = _x(), torch.arange(6)
    torch.manual_seed(1)
    a = m(x, y).loss
    torch.manual_seed(1)
    assert torch.equal(m(x, y).loss, a)
    with pytest.raises(ConfigError, match="cond_dropout"):
        CVAEConfig(cond_dropout=1.0)


def test_the_condition_reaches_encoder_and_decoder():
    m = _model().eval()
    x = _x(2)
    a, b = torch.tensor([1, 1]), torch.tensor([2, 2])
    assert not torch.allclose(m.encode(x, a).mean, m.encode(x, b).mean)
    z = torch.zeros(2, 3)
    assert not torch.allclose(m.decode(z, a).mean, m.decode(z, b).mean)
    # extra leading sample dims of z broadcast the condition
    zk = torch.randn(4, 2, 3)
    many = m.decode(zk, a).logits
    assert torch.allclose(many[2], m.decode(zk[2], a).logits, atol=1e-6)


def test_learned_prior_kl_and_log_prior():
    m = _model(learned_prior=True).eval()
    x, y = _x(), torch.arange(6)
    mean, logvar = m.prior(y)
    assert mean.shape == (6, 3) and not torch.allclose(mean[0], mean[1])
    from torch.distributions import Normal

    z = torch.randn(5, 6, 3)
    ref = Normal(mean, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    assert torch.allclose(m.log_prior(z, y), ref, atol=1e-5)
    out = m(x, y)
    q = out.posterior
    assert torch.allclose(out.kl_per_example, kl_normal(q.mean, q.logvar, mean, logvar).sum(1))
    assert torch.allclose(out.loss, out.recon + out.kl)
    # the standard-normal prior
    s = _model()
    assert torch.allclose(s.log_prior(z, y), Normal(0.0, 1.0).log_prob(z).sum(-1))


def test_conditional_sampling():
    m = _model().eval()
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    imgs = m.sample(3, y=7, generator=g())
    eps = torch.randn(3, 3, generator=g())
    assert torch.allclose(imgs, m.decode(eps, torch.full((3,), 7)).mean)
    assert torch.allclose(m.sample(2, y=torch.tensor([1, 2]), generator=g()),
                          m.decode(torch.randn(2, 3, generator=g()), torch.tensor([1, 2])).mean)
    assert m.sample(4).shape == (4, 1, 28, 28)  # no condition: classes drawn uniformly
    with pytest.raises(InputError, match="rows"):
        m.sample(3, y=torch.tensor([1, 2]))
    v = _model(condition="vector", cond_dim=2)
    with pytest.raises(InputError, match="integer condition"):
        v.sample(2, y=1)
    assert v.sample(2).shape == (2, 1, 28, 28)  # the null condition
