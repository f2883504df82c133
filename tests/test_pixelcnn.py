"""The PixelCNN decoder is autoregressive: a pixel's logit depends only on earlier pixels."""

import pytest
import torch

from vaekit.models import VAE, VAEConfig
from vaekit.nn.pixelcnn import PixelCNNDecoder


@pytest.mark.parametrize("full_context, cond_grid", [(0, 0), (20, 3), (20, 1)])
def test_causality_and_row_cropped_sampling_match_the_full_network(full_context, cond_grid):
    torch.manual_seed(0)
    net = PixelCNNDecoder(4, (1, 12, 12), channels=8, layers=3, dilation_cycle=2, full_context=full_context,
                          full_context_layers=2, cond_grid=cond_grid).double()
    if full_context:
        with torch.no_grad():
            net.full_context.direct.weight.normal_()
    z = torch.randn(2, 4, dtype=torch.float64)
    cond = net.condition(z)
    x = torch.bernoulli(torch.full((2, 1, 12, 12), 0.5, dtype=torch.float64))
    i, j = 6, 5
    x.requires_grad_(True)
    net(x, cond)[0, 0, i, j].backward()
    g = x.grad[0, 0]
    flat = torch.arange(144).view(12, 12)
    later = flat >= i * 12 + j
    assert torch.all(g[later] == 0), "a logit must not depend on its own or later pixels"
    assert g[~later].abs().sum() > 0
    # the row-cropped computation used for sampling equals the full one at the last row
    R = net.receptive_rows
    full = net(x.detach(), cond)[:, :, i, :]
    crop = net(x.detach()[:, :, max(0, i - R) : i + 1], cond[:, :, max(0, i - R) : i + 1])[:, :, -1, :]
    assert torch.allclose(full, crop)


def test_pixel_vae_forward_sample_and_input_dropout():
    torch.manual_seed(0)
    m = VAE(VAEConfig(latent_dim=3, hidden_sizes=(16,), decoder="pixelcnn", pixelcnn_channels=8,
                      pixelcnn_layers=2, decoder_dropout=0.5))
    x = torch.bernoulli(torch.full((4, 1, 28, 28), 0.3))
    out = m(x)
    assert torch.isfinite(out.loss)
    m.eval()
    a = m.decode(out.z.detach()).log_prob(x)
    b = m.decode(out.z.detach()).log_prob(x)
    assert torch.equal(a, b), "no input dropout at evaluation"
    m.train()
    torch.manual_seed(1)
    c = m.decode(out.z.detach()).log_prob(x)
    assert not torch.equal(a, c), "input dropout changes the training likelihood"
    s = m.sample(2)
    assert s.shape == (2, 1, 28, 28) and s.min() >= 0 and s.max() <= 1
