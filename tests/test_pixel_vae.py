"""The local autoregressive decoder: causal, normalized, and sampled consistently with its likelihood."""

import itertools

import pytest
import torch

from vaekit.errors import ConfigError
from vaekit.models import PixelVAE, PixelVAEConfig
from vaekit.models.pixel_vae import causal_mask, receptive_field

SMALL = PixelVAEConfig(latent_dim=3, conv_channels=(8,), encoder_hidden=(16,), decoder_hidden=(16,),
                       ar_kernel=5, ar_channels=8, ar_hidden=(8,), mix_channels=2)


def _model(cfg=SMALL):
    torch.manual_seed(0)
    return PixelVAE(cfg).eval()


def test_logit_of_pixel_i_depends_only_on_earlier_pixels():
    m = _model()
    x = torch.bernoulli(torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    z = torch.randn(1, 3)
    for i in (0, 5, 14 * 28 + 10, 783):
        x.grad = None
        m.decode(z).logits(x).flatten()[i].backward()
        g = x.grad.flatten()
        assert g[i:].abs().sum() == 0, f"pixel {i} sees itself or later pixels"
        if i > 0:
            assert g[:i].abs().sum() > 0


def test_likelihood_is_normalized_on_a_tiny_image():
    # 2x4 images: sum over all 256 binary images of p(x|z) must be 1
    cfg = PixelVAEConfig(input_shape=(1, 2, 4), latent_dim=2, conv_channels=(4,), encoder_hidden=(8,),
                         decoder_hidden=(8,), ar_kernel=3, ar_channels=4, ar_hidden=(4,), mix_channels=1)
    m = _model(cfg)
    xs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=8))).view(-1, 1, 2, 4)
    z = torch.randn(1, 2).expand(len(xs), 2)
    total = torch.logsumexp(m.decode(z).log_prob(xs), 0)
    assert abs(total.item()) < 1e-4


def test_ancestral_sampling_matches_teacher_forced_probabilities():
    m = _model()
    z = torch.randn(4, 3)
    sample, probs = m.ancestral_sample(m.z_maps(z), torch.Generator().manual_seed(2))
    assert set(sample.unique().tolist()) <= {0.0, 1.0}
    tf = torch.sigmoid(m.decode(z).logits(sample))
    assert torch.allclose(tf, probs, atol=1e-5)
    assert m.sample(2).shape == (2, 1, 28, 28)


def test_config_and_geometry():
    assert causal_mask(3).tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert receptive_field(SMALL) == 12
    with pytest.raises(ConfigError, match="odd"):
        PixelVAEConfig(ar_kernel=4)
    with pytest.raises(ConfigError, match="1 channel"):
        PixelVAEConfig(input_shape=(3, 28, 28))


def test_free_bits_are_a_floor_under_a_trainers_kl_control():
    from vaekit.objectives.kl_control import KLControl

    cfg = PixelVAEConfig(latent_dim=3, conv_channels=(8,), encoder_hidden=(16,), decoder_hidden=(16,),
                         ar_kernel=5, ar_channels=8, ar_hidden=(8,), free_bits=2.0)
    m = _model(cfg)
    x = torch.bernoulli(torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(3)))
    torch.manual_seed(0)
    out = m(x, kl_control=KLControl(weight=1.0))
    assert torch.allclose(out.kl_used, out.kl_per_dim.clamp(min=2.0).sum())
    torch.manual_seed(0)
    assert torch.allclose(m(x).loss, out.loss)
