"""Network building blocks checked against PyTorch's own implementations."""

import torch

from vaekit.nn.layers import ACTIVATIONS, Tanh


def test_cpu_tanh_matches_torch_tanh_in_value_and_gradient():
    x = (torch.randn(4096, dtype=torch.float32, generator=torch.Generator().manual_seed(0)) * 6).requires_grad_()
    ours = Tanh()(x)
    ref = torch.tanh(x.detach().double())
    assert (ours.double() - ref).abs().max() < 1e-6
    (g,) = torch.autograd.grad(ours.sum(), x)
    assert (g.double() - (1 - ref**2)).abs().max() < 1e-5
    assert ACTIVATIONS["tanh"] is Tanh
    assert Tanh()(torch.tensor([-200.0, 0.0, 200.0])).tolist() == [-1.0, 0.0, 1.0]  # saturates, never NaN
