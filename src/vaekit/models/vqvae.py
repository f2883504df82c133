"""VQ-VAE (van den Oord et al. 2017) with an EMA or loss-trained codebook and an autoregressive code prior.

x (B, C, H, W) -> conv encoder -> z_e (B, D, h, w) -> nearest codebook entries z_q -> conv
decoder -> p(x|z_q). Loss per example (nats and squared distances, summed over pixels and over
the grid; batch mean):

    loss = -log p(x|z_q) + commitment_beta * ||z_e - sg(z_q)||^2  [+ ||sg(z_e) - z_q||^2 in 'loss' mode]

The prior over index grids (:class:`vaekit.nn.code_prior.CodePrior`) is trained after the
VQ-VAE (:func:`vaekit.models.vqvae_prior.train_code_prior`, ``vaekit train-prior RUN``);
``sample(n)`` draws index grids from it and decodes them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from vaekit.errors import ConfigError, InputError, check_choice, check_positive
from vaekit.models.base import BaseModel, Inspection, ModelOutput, register_model
from vaekit.nn.code_prior import CodePrior
from vaekit.nn.distributions import BernoulliLikelihood, GaussianLikelihood
from vaekit.nn.quantizer import VectorQuantizer, perplexity, usage_fraction


@dataclass
class VQVAEConfig:
    """Hyper-parameters of :class:`VQVAE`. Every field is validated on creation."""

    family: str = "vqvae"  # registry name; selects the model class when loading
    input_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W) of one image
    hidden_channels: int = 64  # channels of the conv bodies
    downsample: int = 2  # stride-2 convolutions: the code grid is (H / 2**downsample, W / 2**downsample)
    residual_blocks: int = 2  # residual blocks after the encoder's convolutions and before the decoder's
    residual_channels: int = 32  # bottleneck width of a residual block
    codebook_size: int = 512  # K, the number of codes
    code_dim: int = 64  # D, the size of a code vector
    commitment_beta: float = 0.25  # weight of the commitment loss ||z_e - sg(e)||^2
    codebook_update: Literal["ema", "loss"] = "ema"  # moving averages, or the codebook loss ||sg(z_e) - e||^2
    ema_decay: float = 0.99  # EMA decay of the code counts and sums
    ema_epsilon: float = 1e-5  # Laplace smoothing of the EMA code counts
    dead_code_steps: int = 100  # a code unused for this many training steps counts as dead
    restart_dead_codes: bool = True  # move dead codes onto random encoder outputs of the current batch
    kmeans_init: bool = False  # fit the codebook by k-means on the first training batch
    kmeans_iters: int = 10  # Lloyd iterations of the k-means initialisation
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"  # p(x|z_q) per pixel
    gaussian_sigma: float = 1.0  # Gaussian likelihood: fixed std
    prior_dim: int = 128  # width of the code prior (a causal transformer over the index grid)
    prior_layers: int = 2  # transformer layers of the code prior
    prior_heads: int = 4  # attention heads of the code prior
    prior_dropout: float = 0.1  # dropout in the code prior while it trains

    def __post_init__(self) -> None:
        if len(self.input_shape) != 3 or any(not isinstance(s, int) or s <= 0 for s in self.input_shape):
            raise ConfigError(f"model.input_shape must be three positive integers (C, H, W), got {self.input_shape!r}")
        for name in ("hidden_channels", "downsample", "residual_channels", "codebook_size", "code_dim",
                     "dead_code_steps", "prior_dim", "prior_layers", "prior_heads"):
            check_positive(f"model.{name}", getattr(self, name), integer=True)
        check_positive("model.residual_blocks", self.residual_blocks, allow_zero=True, integer=True)
        check_positive("model.kmeans_iters", self.kmeans_iters, allow_zero=True, integer=True)
        f = 2 ** self.downsample
        if self.input_shape[1] % f or self.input_shape[2] % f:
            raise ConfigError(f"model.downsample = {self.downsample}: input height and width {self.input_shape[1:]} "
                              f"must be divisible by {f}")
        if self.codebook_size < 2:
            raise ConfigError(f"model.codebook_size must be >= 2, got {self.codebook_size}")
        check_positive("model.commitment_beta", self.commitment_beta, allow_zero=True)
        check_choice("model.codebook_update", self.codebook_update, ("ema", "loss"))
        if not isinstance(self.ema_decay, int | float) or not 0 <= self.ema_decay < 1:
            raise ConfigError(f"model.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        check_positive("model.ema_epsilon", self.ema_epsilon)
        check_choice("model.likelihood", self.likelihood, ("bernoulli", "gaussian"))
        check_positive("model.gaussian_sigma", self.gaussian_sigma)
        if self.prior_dim % self.prior_heads:
            raise ConfigError(f"model.prior_dim ({self.prior_dim}) must be divisible by model.prior_heads "
                              f"({self.prior_heads})")
        if not isinstance(self.prior_dropout, int | float) or not 0 <= self.prior_dropout < 1:
            raise ConfigError(f"model.prior_dropout must be in [0, 1), got {self.prior_dropout!r}")

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the code grid."""
        f = 2 ** self.downsample
        return self.input_shape[1] // f, self.input_shape[2] // f


@dataclass
class VQVAEOutput(ModelOutput):
    """Loss breakdown of one batch (batch means of per-example sums) and codebook statistics."""

    commitment: torch.Tensor  # scalar: ||z_e - sg(e)||^2 summed over the grid (unweighted)
    codebook: torch.Tensor  # scalar: ||sg(z_e) - e||^2 in 'loss' mode, 0 in 'ema' mode
    perplexity: torch.Tensor  # scalar: exp(H) of this batch's code usage (1 .. K)
    code_usage: torch.Tensor  # scalar: fraction of the K codes used in this batch
    dead_codes: torch.Tensor  # scalar: codes unused for dead_code_steps steps (before this step's restarts)
    recon_per_example: torch.Tensor  # (B,): -log p(x|z_q)
    indices: torch.Tensor  # (B, h, w) int64 code indices
    z_e: torch.Tensor  # (B, D, h, w) encoder output
    z_q: torch.Tensor  # (B, D, h, w) quantized, straight-through

    def terms(self) -> dict[str, torch.Tensor]:
        return {"loss": self.loss, "recon": self.recon, "commitment": self.commitment, "codebook": self.codebook,
                "perplexity": self.perplexity, "code_usage": self.code_usage, "dead_codes": self.dead_codes}


class ResidualBlock(nn.Module):
    """x + Conv1x1(ReLU(Conv3x3(ReLU(x)))), as in the VQ-VAE paper."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def _encoder(c: VQVAEConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    ch_in = c.input_shape[0]
    for i in range(c.downsample):
        ch = c.hidden_channels if i == c.downsample - 1 else max(c.hidden_channels // 2, 1)
        layers += [nn.Conv2d(ch_in, ch, 4, stride=2, padding=1), nn.ReLU()]
        ch_in = ch
    layers.append(nn.Conv2d(ch_in, c.hidden_channels, 3, padding=1))
    layers += [ResidualBlock(c.hidden_channels, c.residual_channels) for _ in range(c.residual_blocks)]
    layers += [nn.ReLU(), nn.Conv2d(c.hidden_channels, c.code_dim, 1)]
    return nn.Sequential(*layers)


def _decoder(c: VQVAEConfig) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c.code_dim, c.hidden_channels, 3, padding=1)]
    layers += [ResidualBlock(c.hidden_channels, c.residual_channels) for _ in range(c.residual_blocks)]
    layers.append(nn.ReLU())
    ch_in = c.hidden_channels
    for i in range(c.downsample):
        last = i == c.downsample - 1
        ch = c.input_shape[0] if last else max(c.hidden_channels // 2, 1)
        layers.append(nn.ConvTranspose2d(ch_in, ch, 4, stride=2, padding=1))
        if not last:
            layers.append(nn.ReLU())
        ch_in = ch
    return nn.Sequential(*layers)


@register_model("vqvae")
class VQVAE(BaseModel):
    """VQ-VAE: conv encoder, vector quantizer, conv decoder, and a code prior for sampling."""

    config_class = VQVAEConfig
    discrete_latent = True  # encode gives code indices; no q(z|x) with a density, so no KL or NLL
    # a frozen codebook also keeps its EMA statistics: the trainer holds frozen parts in eval mode
    parameter_group_prefixes = {"encoder": ("encoder",), "decoder": ("decoder", "log_sigma"),
                                "codebook": ("quantizer",), "prior": ("prior", "prior_trained")}

    def __init__(self, config: VQVAEConfig | None = None):
        config = self.resolve_config(config)
        super().__init__(config)
        c = config
        self.encoder = _encoder(c)
        self.decoder = _decoder(c)
        self.quantizer = VectorQuantizer(
            c.codebook_size, c.code_dim, update=c.codebook_update, decay=c.ema_decay, eps=c.ema_epsilon,
            dead_code_steps=c.dead_code_steps, restart_dead_codes=c.restart_dead_codes,
            kmeans_init=c.kmeans_init, kmeans_iters=c.kmeans_iters)
        h, w = c.grid
        self.prior = CodePrior(c.codebook_size, h * w, c.prior_dim, c.prior_layers, c.prior_heads, c.prior_dropout)
        self.register_buffer("prior_trained", torch.tensor(False))
        if c.likelihood == "gaussian":
            self.register_buffer("log_sigma", torch.full(c.input_shape, math.log(c.gaussian_sigma)))

    def configure_optimizers(self, cfg) -> dict[str, torch.optim.Optimizer]:
        """One Adam over the autoencoder (and the codebook in 'loss' mode); the prior trains later."""
        params = [p for n, p in self.named_parameters() if not n.startswith("prior.")]
        return {"main": torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)}

    # -- pieces ------------------------------------------------------------------------------------
    def _quantize(self, z_e: torch.Tensor):
        B, D, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, D)  # (B h w, D)
        q = self.quantizer(flat)
        def grid(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, h, w, D).permute(0, 3, 1, 2)
        return q, grid(q.z_q), grid(q.codes), q.indices.view(B, h, w)

    def _lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_e (B, D, h, w), z_q (B, D, h, w), indices (B, h, w)) of checked images, no codebook update."""
        was = self.quantizer.training
        self.quantizer.eval()
        try:
            z_e = self.encoder(x)
            _, z_q, _, idx = self._quantize(z_e)
        finally:
            self.quantizer.train(was)
        return z_e, z_q, idx

    def encode(self, x: torch.Tensor, y: Any = None) -> torch.Tensor:
        """Code indices (B, h, w) of images x (B, C, H, W) (no codebook update). ``y`` is ignored."""
        return self._lookup(self.check_input(x))[2]

    @torch.no_grad()
    def inspect(self, x: torch.Tensor, y: Any = None, *, check: bool = True) -> Inspection:
        """Reconstruction error at the code grid, the codes, and ``latent_norm``: the mean over grid
        cells of ||z_e|| (the encoder output before quantization; outliers map far from the codebook).
        ``check`` as in :meth:`BaseModel.inspect`."""
        x = self.check_input(x, values=check)
        z_e, z_q, idx = self._lookup(x)
        lik = self.likelihood_from(self.decoder(z_q))
        recon = lik.mean
        return Inspection(reconstruction=recon, recon_nats=-lik.log_prob(x),
                          recon_mse=(x - recon).pow(2).flatten(1).mean(1),
                          latent_norm=z_e.norm(dim=1).flatten(1).mean(1), codes=idx)

    def decode(self, codes: torch.Tensor, y: Any = None) -> BernoulliLikelihood | GaussianLikelihood:
        """p(x|z_q) from code indices (B, h, w) int64 or quantized vectors (B, D, h, w) float. ``y`` is ignored."""
        if not isinstance(codes, torch.Tensor):
            raise InputError(f"codes must be a tensor, got {type(codes).__name__}")
        h, w = self.config.grid
        if codes.dtype == torch.int64:
            if codes.ndim != 3 or tuple(codes.shape[1:]) != (h, w):
                raise InputError(f"code indices must have shape (B, {h}, {w}), got {tuple(codes.shape)}")
            if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.codebook_size):
                raise InputError(f"code indices must lie in [0, {self.config.codebook_size - 1}]")
            codes = self.quantizer.codebook[codes].permute(0, 3, 1, 2)
        elif not codes.is_floating_point() or codes.ndim != 4 or tuple(codes.shape[1:]) != (self.config.code_dim, h, w):
            raise InputError(f"decode takes code indices (B, {h}, {w}) int64 or quantized vectors "
                             f"(B, {self.config.code_dim}, {h}, {w}) float, got {codes.dtype} {tuple(codes.shape)}")
        elif not bool(torch.isfinite(codes).all()):
            raise InputError("quantized vectors hold NaN or inf values")
        out = self.decoder(codes)
        return self.likelihood_from(out)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, check: bool = True) -> VQVAEOutput:
        """Loss of a batch x (B, C, H, W); in training mode the codebook state is updated. ``y`` is ignored."""
        x = self.check_input(x, values=check)
        z_e = self.encoder(x)  # (B, D, h, w)
        q, z_q, codes, idx = self._quantize(z_e)
        recon_pe = -self.likelihood_from(self.decoder(z_q)).log_prob(x)  # (B,)
        commit = (z_e - codes.detach()).pow(2).sum((1, 2, 3)).mean()
        if self.config.codebook_update == "loss":
            cb = (z_e.detach() - codes).pow(2).sum((1, 2, 3)).mean()
        else:
            cb = torch.zeros((), device=x.device)
        recon = recon_pe.mean()
        loss = recon + self.config.commitment_beta * commit + cb
        return VQVAEOutput(
            loss=loss, recon=recon, commitment=commit.detach(), codebook=cb.detach(),
            perplexity=perplexity(q.counts), code_usage=usage_fraction(q.counts),
            dead_codes=torch.tensor(float(q.dead_codes), device=x.device),
            recon_per_example=recon_pe, indices=idx, z_e=z_e, z_q=z_q,
        )

    # -- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, y: Any = None, generator: torch.Generator | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        """``n`` images (n, C, H, W): index grids drawn from the code prior, decoded (decoder mean)."""
        self.check_count(n)
        if not bool(self.prior_trained):
            warnings.warn("the VQ-VAE's code prior has not been trained (vaekit train-prior RUN); "
                          "samples come from an untrained prior", stacklevel=3)  # past the no_grad wrapper
        was = self.prior.training
        self.prior.eval()
        try:
            codes = self.prior.sample(n, temperature, generator)
        finally:
            self.prior.train(was)
        h, w = self.config.grid
        return self.decode(codes.view(n, h, w)).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: Any = None) -> torch.Tensor:
        """Decoder mean at the quantized code grid of x, (B, C, H, W). ``y`` is ignored."""
        return self.likelihood_from(self.decoder(self._lookup(self.check_input(x))[1])).mean

    @torch.no_grad()
    def code_statistics(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Code usage over every example of ``batches``: fraction of codes used, perplexity, count of unused."""
        counts = torch.zeros(self.config.codebook_size, dtype=torch.float64)
        n = 0
        for x, _ in batches:
            idx = self.encode(x.to(self.device))
            counts += torch.bincount(idx.flatten().cpu(), minlength=self.config.codebook_size).double()
            n += x.shape[0]
        if n == 0:
            raise InputError("code_statistics received no batches")
        return {"code_usage": float(usage_fraction(counts)), "perplexity": float(perplexity(counts)),
                "unused_codes": int((counts == 0).sum()), "n": n}
