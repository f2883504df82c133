"""A small PixelCNN decoder (van den Oord et al. 2016) conditioned on z: a strong,
autoregressive p(x|z) = prod_i p(x_i | x_<i, z) for binary images, in raster order.

It sees the pixels above and to the left of each position through masked convolutions,
so it can model much of an image without z: the setting where posterior collapse happens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaekit.errors import ConfigError


class MaskedConv2d(nn.Conv2d):
    """Convolution whose kernel sees only rows above and, in the centre row, columns to the left.

    Mask ``A`` also hides the centre pixel (first layer: a pixel never sees itself); ``B``
    keeps it (later layers: the centre holds features of the pixels before it).
    """

    def __init__(self, mask_type: str, c_in: int, c_out: int, kernel: int, dilation: int = 1):
        if mask_type not in ("A", "B") or kernel % 2 == 0:
            raise ConfigError(f"mask_type must be 'A' or 'B' and kernel odd, got {mask_type!r}, {kernel}")
        super().__init__(c_in, c_out, kernel, padding=dilation * (kernel // 2), dilation=dilation)
        mask = torch.ones_like(self.weight)
        c = kernel // 2
        mask[:, :, c, c + (mask_type == "B"):] = 0
        mask[:, :, c + 1 :, :] = 0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding, self.dilation)


class MaskedLinear(nn.Linear):
    """A linear map with a fixed 0/1 connectivity ``mask`` (out_features, in_features)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Autoregressive n -> n logits in raster order (Germain et al. 2015): output i sees inputs j < i.

    ``layers`` masked hidden layers of ``hidden`` units (degrees spread evenly over 1..n-1)
    plus a direct masked linear connection. Every pixel sees every earlier pixel: no blind spot.
    """

    def __init__(self, n: int, hidden: int, layers: int = 1):
        super().__init__()
        deg_in = torch.arange(1, n + 1)
        self.direct = MaskedLinear((deg_in[:, None] > deg_in[None, :]).float())
        with torch.no_grad():
            self.direct.weight.zero_()
        self.hidden = nn.ModuleList()
        if hidden > 0 and layers > 0:
            deg_h = torch.linspace(1, n - 1, hidden).round().long()
            prev = deg_in
            for _ in range(layers):
                self.hidden.append(MaskedLinear((deg_h[:, None] >= prev[None, :]).float()))
                prev = deg_h
            self.out = MaskedLinear((deg_in[:, None] > deg_h[None, :]).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.direct(x)
        if len(self.hidden):
            h = x
            for layer in self.hidden:
                h = F.relu(layer(h))
            y = y + self.out(h)
        return y


class PixelCNNDecoder(nn.Module):
    """logits (B, C, H, W) of Bernoulli pixels from the image so far (teacher forcing) and z.

    z is mapped to a feature map (B, channels, H, W) added inside every masked layer, so
    every pixel's distribution can depend on z. ``receptive_rows`` is how many rows above a
    pixel the network can see.
    """

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], channels: int = 32, layers: int = 5,
                 kernel: int = 3, first_kernel: int = 7, dilation_cycle: int = 1, full_context: int = 0,
                 full_context_layers: int = 1, cond_grid: int = 0):
        super().__init__()
        C, H, W = image_shape
        grid = cond_grid or H
        if H != W or H % grid:
            raise ConfigError(f"cond_grid must divide the (square) image size {H}x{W}, got {cond_grid}")
        self.image_shape, self.channels, self.grid = (C, H, W), channels, grid
        # dilations 1, 2, 4, ... repeating every `dilation_cycle` layers widen the context cheaply
        dilations = [2 ** (i % dilation_cycle) for i in range(layers)]
        # z sets a bias for every channel on a grid x grid map, repeated over blocks of pixels:
        # grid = H is one bias per position, grid = 1 one per channel, the same everywhere (the
        # conditional PixelCNN of van den Oord et al. 2016). A coarser grid is a weaker path for z.
        self.cond = nn.Linear(latent_dim, channels * grid * grid)
        self.first = MaskedConv2d("A", C, channels, first_kernel)
        self.layers = nn.ModuleList(MaskedConv2d("B", channels, channels, kernel, d) for d in dilations)
        self.cond_proj = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, C, 1))
        self.receptive_rows = first_kernel // 2 + sum(d * (kernel // 2) for d in dilations)
        self.full_context = None
        if full_context:
            # every pixel also sees ALL earlier pixels through a MADE over the raster order
            # (`full_context` hidden units): no blind spot, no receptive-field limit
            if C != 1:
                raise ConfigError(f"full_context supports one channel, got {C}")
            self.full_context = MADE(H * W, full_context, full_context_layers)
            self.receptive_rows = H

    def condition(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, D) -> conditioning map (N, channels, H, W)."""
        H, W = self.image_shape[1:]
        g = self.grid
        m = self.cond(z).view(-1, self.channels, g, g)
        if g == H:
            return m
        if g == 1:
            return m.expand(-1, -1, H, W)
        b = H // g
        return m.repeat_interleave(b, dim=2).repeat_interleave(b, dim=3)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) in [0, 1], cond (N, channels, H', W) (H' = H or a row crop) -> logits."""
        h = self.first(x) + cond
        for conv, proj in zip(self.layers, self.cond_proj, strict=True):
            h = h + F.relu(conv(F.relu(h)) + proj(cond))
        logits = self.head(h)
        if self.full_context is not None:
            # while sampling x holds rows 0..i only (receptive_rows = H: crops start at row 0)
            rows = x.shape[2]
            full = self.full_context(F.pad(x, (0, 0, 0, self.image_shape[1] - rows)).flatten(1))
            logits = logits + full.view(-1, 1, *self.image_shape[1:])[:, :, :rows]
        return logits

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw images pixel by pixel: (binary samples, their per-pixel probabilities), each (N, C, H, W).

        Only the rows a pixel can see are computed at each step, which gives the same
        result as the full image (the masks hide everything below) at a fraction of the cost.
        """
        N = cond.shape[0]
        C, H, W = self.image_shape
        x = torch.zeros(N, C, H, W, device=cond.device)
        probs = torch.zeros_like(x)
        R = self.receptive_rows
        for i in range(H):
            top = max(0, i - R)
            for j in range(W):
                logits = self(x[:, :, top : i + 1], cond[:, :, top : i + 1])[:, :, -1, j]  # (N, C)
                p = torch.sigmoid(logits)
                u = torch.rand(p.shape, generator=generator, device="cpu").to(p.device)
                probs[:, :, i, j] = p
                x[:, :, i, j] = (u < p).to(x.dtype)
        return x, probs


class AutoregressiveBernoulli:
    """p(x|z) given by a :class:`PixelCNNDecoder`; z may carry leading sample dims (..., B, D).

    ``input_dropout`` (training only) hides each input pixel from the decoder with that
    probability (the image analogue of word dropout, Bowman et al. 2016), forcing it to
    rely on z. Targets are never dropped.
    """

    def __init__(self, net: PixelCNNDecoder, z: torch.Tensor, input_dropout: float = 0.0, training: bool = False):
        self.net, self.z, self.input_dropout, self.training = net, z, input_dropout, training

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over pixels: (..., B)."""
        lead = self.z.shape[:-1]
        z = self.z.reshape(-1, self.z.shape[-1])
        reps = z.shape[0] // x.shape[0]
        xs = x.unsqueeze(0).expand(reps, *x.shape).reshape(-1, *x.shape[1:]) if reps > 1 else x
        inp = xs
        if self.training and self.input_dropout > 0:
            keep = torch.rand_like(xs) >= self.input_dropout
            inp = xs * keep
        logits = self.net(inp, self.net.condition(z))
        lp = -F.binary_cross_entropy_with_logits(logits, xs, reduction="none").flatten(1).sum(1)
        return lp.view(lead)

    def sample(self) -> torch.Tensor:
        z = self.z.reshape(-1, self.z.shape[-1])
        return self.net.sample(self.net.condition(z))[0].view(*self.z.shape[:-1], *self.net.image_shape)

    @property
    def mean(self) -> torch.Tensor:
        """Per-pixel probabilities along one sampled path (an autoregressive model has no cheap mean)."""
        z = self.z.reshape(-1, self.z.shape[-1])
        return self.net.sample(self.net.condition(z))[1].view(*self.z.shape[:-1], *self.net.image_shape)
