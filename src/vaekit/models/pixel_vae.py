"""A convolutional VAE whose decoder adds a local autoregressive term (a one-layer PixelCNN head).

Binary images only (Bernoulli pixels). The decoder factorizes over pixels in raster order,

    p(x | z) = prod_i Bernoulli(x_i; sigmoid(l_i)),
    l_i = a0_i(x_<i) + g0_i(z) + sum_c a_c,i(x_<i) * g_c,i(z),

where ``a(x)`` comes from one masked ``K x K`` convolution (mask "A" of van den Oord et al. 2016:
the rows above and the pixels to the left, never the pixel itself) followed by pointwise (1x1)
layers (implemented as a gather of the causal taps and per-pixel Linear layers), and ``g(z)``
from an MLP that outputs ``1 + mix_channels`` maps. Two design choices make this model cheap to
*evaluate* with thousands of importance samples, which is what an NLL with k = 5000 needs:

* the autoregressive features depend on x only, so they are computed once per image and shared by
  every latent sample; per sample the cost is the z-MLP plus ``1 + mix_channels`` products per pixel;
* the receptive field is a single masked convolution followed by 1x1 layers, so ancestral sampling
  updates one pixel per step from its ``K x K`` causal window (784 small steps, no re-running the
  whole network).

The local context captures stroke-level correlations; everything global must go through z, which
keeps the latent code in use (the motivation of PixelVAE, Gulrajani et al. 2017, and of the lossy
VAE of Chen et al. 2017, who also restrict the autoregressive receptive field).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vaekit.errors import ConfigError, check_choice, check_positive
from vaekit.models.base import BaseModel, register_model
from vaekit.models.vae import VAEOutput
from vaekit.nn.distributions import DiagonalGaussian
from vaekit.nn.layers import ACTIVATIONS, ConvEncoder, activation, mlp
from vaekit.objectives.kl_control import KLControl, kl_term
from vaekit.objectives.likelihoods import bernoulli_log_prob


@dataclass
class PixelVAEConfig:
    """Hyper-parameters of :class:`PixelVAE`. Every field is validated on creation."""

    family: str = "pixel_vae"  # registry name; selects the model class when loading
    input_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W); C must be 1 (binary images)
    latent_dim: int = 32  # D, the size of z
    conv_channels: tuple[int, ...] = (32, 64)  # encoder: channels of each stride-2 4x4 convolution
    encoder_hidden: tuple[int, ...] = (256,)  # encoder: Linear widths after the convolutions
    decoder_hidden: tuple[int, ...] = (256,)  # z-MLP widths before the per-pixel output maps
    mix_channels: int = 1  # c >= 0: multiplicative maps shared by the z and x paths (0: additive only)
    ar_kernel: int = 7  # K, odd: size of the masked causal window
    ar_channels: int = 64  # channels of the masked convolution
    ar_hidden: tuple[int, ...] = (64,)  # pointwise (1x1) layer widths after the masked convolution
    activation: str = "relu"  # one of nn.layers.ACTIVATIONS
    beta: float = 1.0  # weight of the KL term
    free_bits: float = 0.0  # lambda, nats per latent dim: optimize sum_j max(lambda, KL_j) (0: off; a floor under kl.*)

    def __post_init__(self) -> None:
        if len(self.input_shape) != 3 or any(not isinstance(s, int) or s <= 0 for s in self.input_shape):
            raise ConfigError(f"model.input_shape must be three positive integers (C, H, W), got {self.input_shape!r}")
        if self.input_shape[0] != 1:
            raise ConfigError(f"model.input_shape must have 1 channel for pixel_vae (binary images), "
                              f"got {self.input_shape[0]}")
        check_positive("model.latent_dim", self.latent_dim, integer=True)
        if not self.conv_channels:
            raise ConfigError("model.conv_channels must be non-empty for pixel_vae")
        for name in ("conv_channels", "encoder_hidden", "decoder_hidden", "ar_hidden"):
            for h in getattr(self, name):
                check_positive(f"model.{name}[i]", h, integer=True)
        check_positive("model.mix_channels", self.mix_channels, allow_zero=True, integer=True)
        check_positive("model.ar_kernel", self.ar_kernel, integer=True)
        if self.ar_kernel % 2 == 0:
            raise ConfigError(f"model.ar_kernel must be odd, got {self.ar_kernel}")
        check_positive("model.ar_channels", self.ar_channels, integer=True)
        check_choice("model.activation", self.activation, tuple(ACTIVATIONS))
        check_positive("model.beta", self.beta, allow_zero=True)
        check_positive("model.free_bits", self.free_bits, allow_zero=True)


def causal_mask(kernel: int) -> torch.Tensor:
    """(K, K) mask "A": 1 on the rows above the centre and left of the centre in its row, else 0."""
    mask = torch.zeros(kernel, kernel)
    c = kernel // 2
    mask[:c, :] = 1.0
    mask[c, :c] = 1.0
    return mask


def causal_offsets(kernel: int) -> list[tuple[int, int]]:
    """(dy, dx) of the pixels inside mask "A" relative to the centre, in raster order."""
    c = kernel // 2
    mask = causal_mask(kernel)
    return [(r - c, q - c) for r in range(kernel) for q in range(kernel) if mask[r, q] > 0]


def causal_taps(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """The already generated neighbours of every pixel: x (B, 1, H, W) -> (B, H, W, T), zeros off the image.

    Same as a convolution with mask "A" applied to the weights, but gathering only the T causal
    taps and applying the weights as one matmul, which is several times faster on CPU than a
    masked K x K convolution followed by 1x1 convolutions.
    """
    c = kernel // 2
    H, W = x.shape[-2:]
    xp = F.pad(x[:, 0], (c, c, c, 0))  # pad left, right and top; nothing below is ever used
    return torch.stack([xp[:, c + dy : c + dy + H, c + dx : c + dx + W] for dy, dx in causal_offsets(kernel)], -1)


class LocalARLikelihood:
    """p(x | z) of :class:`PixelVAE` for z with any leading sample dims.

    Holds the z-maps ``g`` (..., 1 + c, H, W); ``log_prob(x)`` runs the causal x-path once per
    image and broadcasts it over the sample dims. ``mean`` and ``sample()`` run ancestral
    sampling (an autoregressive decoder has no closed-form mean): ``mean`` holds, at each pixel,
    P(x_i = 1 | sampled x_<i, z), which is a grey-level picture of one sampling path.
    """

    def __init__(self, model: PixelVAE, g: torch.Tensor, generator: torch.Generator | None = None):
        self.model, self.g, self.generator = model, g, generator
        self._path: tuple[torch.Tensor, torch.Tensor] | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits for images x (B, 1, H, W): (..., B, 1, H, W)."""
        a = self.model.x_features(x)  # (B, 1 + c, H, W)
        return combine(a, self.g)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over pixels: (..., B). x must be binary for an exact likelihood."""
        return bernoulli_log_prob(self.logits(x), x, 3)

    def _sample_path(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._path is None:
            self._path = self.model.ancestral_sample(self.g, self.generator)
        return self._path

    @property
    def mean(self) -> torch.Tensor:
        return self._sample_path()[1]

    def sample(self) -> torch.Tensor:
        return self._sample_path()[0]


def combine(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Logits from x-maps a (B, 1 + c, H, W) and z-maps g (..., B, 1 + c, H, W): (..., B, 1, H, W)."""
    logits = a[:, :1] + g[..., :1, :, :]
    if a.shape[1] > 1:
        logits = logits + (a[:, 1:] * g[..., 1:, :, :]).sum(-3, keepdim=True)
    return logits


@register_model("pixel_vae")
class PixelVAE(BaseModel):
    """Conv encoder, z-MLP decoder plus a one-layer causal (PixelCNN-style) term; Bernoulli pixels."""

    config_class = PixelVAEConfig
    supports_kl_control = True
    gaussian_posterior = True
    defines_elbo = True
    parameter_group_prefixes = {"encoder": ("encoder", "to_mean", "to_logvar"),
                                "decoder": ("z_body", "z_out", "ar_in", "ar_head", "ar_act", "log_sigma")}

    def __init__(self, config: PixelVAEConfig | None = None):
        config = self.resolve_config(config)
        super().__init__(config)
        c = config
        _, H, W = c.input_shape
        maps = 1 + c.mix_channels
        self.encoder = ConvEncoder(c.input_shape, c.conv_channels, c.encoder_hidden, c.activation)
        self.to_mean = nn.Linear(self.encoder.out_features, c.latent_dim)
        self.to_logvar = nn.Linear(self.encoder.out_features, c.latent_dim)
        self.z_body = mlp([c.latent_dim, *c.decoder_hidden], c.activation, final_act=True) \
            if c.decoder_hidden else nn.Identity()
        self.z_out = nn.Linear(c.decoder_hidden[-1] if c.decoder_hidden else c.latent_dim, maps * H * W)
        # pixel-wise network on the causal window: Linear layers over the last (channel) axis
        self.ar_in = nn.Linear(len(causal_offsets(c.ar_kernel)), c.ar_channels)
        self.ar_head = mlp([c.ar_channels, *c.ar_hidden, maps], c.activation, final_act=False)
        self.ar_act = activation(c.activation)

    # -- the probabilistic pieces ----------------------------------------------------------------
    def encode(self, x: torch.Tensor, y: Any = None) -> DiagonalGaussian:
        """q(z|x) for x (B, 1, H, W): a DiagonalGaussian with mean and logvar (B, D). ``y`` is ignored."""
        return self._encode(self.check_input(x))

    def _posterior_of_checked(self, x: torch.Tensor, y: Any) -> DiagonalGaussian:
        return self._encode(x)

    def _encode(self, x: torch.Tensor) -> DiagonalGaussian:
        h = self.encoder(x)
        return DiagonalGaussian(self.to_mean(h), self.to_logvar(h))

    def z_maps(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., 1 + c, H, W): the latent part of every pixel's logit."""
        _, H, W = self.config.input_shape
        lead = z.shape[:-1]
        out = self.z_out(self.z_body(z.reshape(-1, z.shape[-1])))
        return out.view(*lead, 1 + self.config.mix_channels, H, W)

    def x_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, 1 + c, H, W): the causal part; pixel i sees only x_<i."""
        taps = causal_taps(x, self.config.ar_kernel)  # (B, H, W, T)
        return self.ar_head(self.ar_act(self.ar_in(taps))).permute(0, 3, 1, 2)

    def decode(self, z: torch.Tensor, y: Any = None, generator: torch.Generator | None = None) -> LocalARLikelihood:
        """p(x|z) for z (..., B, D); ``log_prob(x)`` returns (..., B). ``y`` is ignored; ``generator``
        drives the ancestral path behind ``mean``."""
        return LocalARLikelihood(self, self.z_maps(self.check_latent(z)), generator)

    def _decode_at(self, z: torch.Tensor, y: Any) -> LocalARLikelihood:
        # reconstructions are deterministic, like the VAE's, so grids and tests are stable
        return self.decode(z, None, torch.Generator().manual_seed(0))

    @torch.no_grad()
    def ancestral_sample(self, g: torch.Tensor, generator: torch.Generator | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample x pixel by pixel in raster order given z-maps g (..., 1 + c, H, W).

        Only the K x K causal window of each pixel is recomputed (the layers after the masked
        convolution are 1x1). Returns (binary sample, P(x_i = 1 | sampled x_<i, z)), both
        (..., 1, H, W).
        """
        lead = g.shape[:-3]
        _, H, W = self.config.input_shape
        g = g.reshape(-1, *g.shape[-3:])
        n, K = g.shape[0], self.config.ar_kernel
        pad = K // 2
        canvas = torch.zeros(n, 1, H + 2 * pad, W + 2 * pad, device=g.device, dtype=g.dtype)
        probs = torch.zeros(n, 1, H, W, device=g.device, dtype=g.dtype)
        rows = [pad + dy for dy, _ in causal_offsets(K)]  # tap positions inside the K x K window
        cols = [pad + dx for _, dx in causal_offsets(K)]
        with _single_thread(n < 512):
            for r in range(H):
                for col in range(W):
                    taps = canvas[:, 0, r : r + K, col : col + K][:, rows, cols]  # (n, T)
                    a = self.ar_head(self.ar_act(self.ar_in(taps)))  # (n, 1 + c)
                    logit = combine(a[:, :, None, None], g[:, :, r : r + 1, col : col + 1])[:, 0, 0, 0]
                    p = torch.sigmoid(logit)
                    u = torch.rand(n, generator=generator, device="cpu", dtype=p.dtype).to(p.device) \
                        if generator is not None else torch.rand_like(p)
                    canvas[:, 0, r + pad, col + pad] = (u < p).to(canvas.dtype)
                    probs[:, 0, r, col] = p
        sample = canvas[:, :, pad : pad + H, pad : pad + W].clone()
        return sample.view(*lead, 1, H, W), probs.view(*lead, 1, H, W)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        beta: float | None = None,
        kl_control: KLControl | None = None,
        check: bool = True,
    ) -> VAEOutput:
        """Negative ELBO of a batch x (B, 1, H, W), one reparameterized sample per example.

        Same terms and options as :meth:`vaekit.models.vae.VAE.forward`; ``y`` is ignored.
        ``kl_control`` (the trainer's KL schedule) sets the weight; ``config.free_bits`` is a floor on
        its free bits, so the recipe's setting holds under any schedule.
        """
        x = self.check_input(x, values=check)
        posterior = self._encode(x)
        z = posterior.rsample()
        recon_pe = -LocalARLikelihood(self, self.z_maps(z)).log_prob(x)  # (B,)
        kl_pd = posterior.kl()  # (B, D)
        kl_pe = kl_pd.sum(1)
        recon, kl, kl_dim = recon_pe.mean(), kl_pe.mean(), kl_pd.mean(0)
        control = kl_control or KLControl(weight=self.config.beta if beta is None else beta)
        if self.config.free_bits > control.free_bits:
            # the model's free bits are a floor: a trainer's KL schedule must not silently drop them
            control = dataclasses.replace(control, free_bits=self.config.free_bits)
        term, kl_used = kl_term(kl_dim, control)
        return VAEOutput(
            loss=recon + term, recon=recon, kl=kl, kl_per_dim=kl_dim, kl_used=kl_used,
            recon_per_example=recon_pe, kl_per_example=kl_pe, z=z, posterior=posterior,
        )

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, y: Any = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images (n, 1, H, W): P(x_i = 1 | sampled x_<i, z) along one ancestral path, z ~ N(0, I)."""
        self.check_count(n)
        z = torch.randn(n, self.config.latent_dim, generator=generator).to(self.device) if generator is not None \
            else torch.randn(n, self.config.latent_dim, device=self.device)
        return self.decode(z, None, generator).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: Any = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral decoding at the posterior mean, (B, 1, H, W) (see :class:`LocalARLikelihood`);
        deterministic (seed 0) unless a ``generator`` is given."""
        mean = self.encode(x).mean
        return (self._decode_at(mean, y) if generator is None else self.decode(mean, y, generator)).mean


@contextlib.contextmanager
def _single_thread(active: bool) -> Iterator[None]:
    """Run tiny per-pixel ops on one thread: on a busy machine, idle OpenMP workers spinning on
    784 sequential small steps make sampling 50-100x slower than one thread."""
    before = torch.get_num_threads()
    if active and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def receptive_field(config: PixelVAEConfig) -> int:
    """Number of earlier pixels each pixel's x-path sees (inside the image, away from borders)."""
    return int(causal_mask(config.ar_kernel).sum().item())


__all__ = ["LocalARLikelihood", "PixelVAE", "PixelVAEConfig", "causal_mask", "causal_offsets", "causal_taps",
           "receptive_field"]
