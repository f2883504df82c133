"""The Gaussian VAE (Kingma & Welling 2014) with MLP or convolutional networks.

encoder -> (mean, logvar) -> z = mean + exp(logvar / 2) * eps -> decoder -> p(x|z),
trained on the negative ELBO  E_q[-log p(x|z)] + beta * KL(q(z|x) || N(0, I)),
or (``objective: iwae``) on the k-sample importance-weighted bound of Burda et al. (2015),
computed by :mod:`vaekit.objectives.iwae`, the same code the NLL evaluation uses.
Subclasses (conditional VAE, beta-TCVAE) reuse the pieces through ``cond`` arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from vaekit.errors import ConfigError, InputError, check_choice, check_positive
from vaekit.models.base import BaseModel, ModelOutput, register_model
from vaekit.nn.distributions import BernoulliLikelihood, DiagonalGaussian, GaussianLikelihood
from vaekit.nn.layers import ACTIVATIONS, ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder
from vaekit.nn.pixelcnn import AutoregressiveBernoulli, PixelCNNDecoder
from vaekit.objectives.iwae import importance_terms, iwae_bound
from vaekit.objectives.kl_control import KLControl, kl_term


@dataclass
class VAEConfig:
    """Hyper-parameters of :class:`VAE`. Every field is validated on creation."""

    family: str = "vae"  # registry name; selects the model class when loading
    input_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W) of one image
    latent_dim: int = 20  # D, the size of z
    architecture: Literal["mlp", "conv"] = "mlp"  # encoder/decoder body
    hidden_sizes: tuple[int, ...] = (400,)  # MLP widths (encoder order; the decoder mirrors them)
    conv_channels: tuple[int, ...] = (32, 64)  # conv body: channels of each stride-2 layer
    activation: str = "relu"  # one of nn.layers.ACTIVATIONS
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"  # p(x|z) per pixel
    gaussian_sigma: float = 1.0  # Gaussian likelihood: fixed std, or the initial std when learned
    learn_sigma: bool = False  # Gaussian likelihood: learn one std per pixel
    beta: float = 1.0  # weight of the KL term (beta-VAE when != 1)
    decoder: Literal["mirror", "pixelcnn"] = "mirror"  # mirror of the encoder body, or an autoregressive PixelCNN
    pixelcnn_channels: int = 32  # PixelCNN decoder: feature channels
    pixelcnn_layers: int = 5  # PixelCNN decoder: masked 3x3 layers after the 7x7 first one
    pixelcnn_dilation_cycle: int = 1  # PixelCNN decoder: dilations 1, 2, 4, ... repeat every N layers (1: none)
    pixelcnn_full_context: int = 0  # PixelCNN decoder: hidden units of a MADE term over all earlier pixels (0: off)
    pixelcnn_full_context_layers: int = 1  # PixelCNN decoder: hidden layers of that MADE term
    pixelcnn_cond_grid: int = 0  # PixelCNN decoder: z enters as a bias map of this size (0: full size; 1: global)
    decoder_dropout: float = 0.0  # PixelCNN decoder: probability of hiding each input pixel while training
    objective: Literal["elbo", "iwae"] = "elbo"  # training bound: the ELBO, or the k-sample IWAE bound
    iwae_k: int = 5  # importance samples per example for objective 'iwae' (k = 1 is the ELBO)

    def __post_init__(self) -> None:
        if len(self.input_shape) != 3 or any(not isinstance(s, int) or s <= 0 for s in self.input_shape):
            raise ConfigError(f"model.input_shape must be three positive integers (C, H, W), got {self.input_shape!r}")
        check_positive("model.latent_dim", self.latent_dim, integer=True)
        check_choice("model.architecture", self.architecture, ("mlp", "conv"))
        check_choice("model.likelihood", self.likelihood, ("bernoulli", "gaussian"))
        check_choice("model.activation", self.activation, tuple(ACTIVATIONS))
        for h in self.hidden_sizes:
            check_positive("model.hidden_sizes[i]", h, integer=True)
        for c in self.conv_channels:
            check_positive("model.conv_channels[i]", c, integer=True)
        if self.architecture == "conv" and not self.conv_channels:
            raise ConfigError("model.conv_channels must be non-empty for architecture 'conv'")
        check_positive("model.gaussian_sigma", self.gaussian_sigma)
        check_positive("model.beta", self.beta, allow_zero=True)
        check_choice("model.decoder", self.decoder, ("mirror", "pixelcnn"))
        check_positive("model.pixelcnn_channels", self.pixelcnn_channels, integer=True)
        check_positive("model.pixelcnn_layers", self.pixelcnn_layers, allow_zero=True, integer=True)
        check_positive("model.pixelcnn_dilation_cycle", self.pixelcnn_dilation_cycle, integer=True)
        check_positive("model.pixelcnn_full_context", self.pixelcnn_full_context, allow_zero=True, integer=True)
        check_positive("model.pixelcnn_full_context_layers", self.pixelcnn_full_context_layers, integer=True)
        check_positive("model.pixelcnn_cond_grid", self.pixelcnn_cond_grid, allow_zero=True, integer=True)
        if not 0 <= self.decoder_dropout < 1:
            raise ConfigError(f"model.decoder_dropout must be in [0, 1), got {self.decoder_dropout!r}")
        if self.decoder == "pixelcnn" and self.likelihood != "bernoulli":
            raise ConfigError("model.decoder 'pixelcnn' models binary pixels: it needs model.likelihood 'bernoulli'")
        check_choice("model.objective", self.objective, ("elbo", "iwae"))
        check_positive("model.iwae_k", self.iwae_k, integer=True)
        if self.objective == "iwae" and self.beta != 1.0:
            raise ConfigError(f"model.beta must be 1.0 with objective 'iwae' (the bound has no KL weight), "
                              f"got {self.beta!r}")


@dataclass
class VAEOutput(ModelOutput):
    """Loss breakdown of one batch. Scalars are batch means of per-example sums, in nats."""

    kl: torch.Tensor  # scalar: mean over the batch of KL(q(z|x) || p(z))
    kl_per_dim: torch.Tensor  # (D,): batch mean of the KL of each latent dimension
    kl_used: torch.Tensor  # scalar: the KL as optimized (after free bits / floor); equals kl without them
    recon_per_example: torch.Tensor  # (B,): -log p(x|z) per example
    kl_per_example: torch.Tensor  # (B,): KL per example
    z: torch.Tensor  # (B, D): the reparameterized sample (the first of k under the IWAE objective)
    posterior: DiagonalGaussian
    iwae: torch.Tensor | None = None  # scalar: batch mean of the k-sample bound L_k (IWAE objective only)

    @property
    def elbo_per_example(self) -> torch.Tensor:
        """(B,) the evidence lower bound per example (beta = 1), nats."""
        return -(self.recon_per_example + self.kl_per_example)

    def terms(self) -> dict[str, torch.Tensor]:
        return {"loss": self.loss, "recon": self.recon, "kl": self.kl}


@register_model("vae")
class VAE(BaseModel):
    """Gaussian-posterior VAE with a Bernoulli or Gaussian likelihood."""

    config_class = VAEConfig
    gaussian_posterior = True
    defines_elbo = True
    parameter_group_prefixes = {"encoder": ("encoder", "to_mean", "to_logvar"), "decoder": ("decoder", "log_sigma")}

    def __init__(self, config: VAEConfig | None = None, cond_size: int = 0):
        """``cond_size`` > 0 (subclasses) widens the encoder head and the decoder input for a condition."""
        config = self.resolve_config(config)
        super().__init__(config)
        c = config
        out_shape = c.input_shape
        z_in = c.latent_dim + cond_size  # a condition (subclasses) joins z at the decoder input
        self.decoder: nn.Module
        if c.architecture == "mlp":
            self.encoder = MLPEncoder(c.input_shape, c.hidden_sizes, c.activation)
            if c.decoder == "mirror":
                self.decoder = MLPDecoder(z_in, out_shape, c.hidden_sizes, c.activation)
        else:
            self.encoder = ConvEncoder(c.input_shape, c.conv_channels, c.hidden_sizes, c.activation)
            if c.decoder == "mirror":
                self.decoder = ConvDecoder(z_in, out_shape, c.conv_channels, c.hidden_sizes, c.activation)
        if c.decoder == "pixelcnn":
            self.decoder = PixelCNNDecoder(z_in, c.input_shape, c.pixelcnn_channels, c.pixelcnn_layers,
                                           dilation_cycle=c.pixelcnn_dilation_cycle,
                                           full_context=c.pixelcnn_full_context,
                                           full_context_layers=c.pixelcnn_full_context_layers,
                                           cond_grid=c.pixelcnn_cond_grid)
        self.to_mean = nn.Linear(self.encoder.out_features + cond_size, c.latent_dim)
        self.to_logvar = nn.Linear(self.encoder.out_features + cond_size, c.latent_dim)
        if c.likelihood == "gaussian":
            init = torch.full(c.input_shape, math.log(c.gaussian_sigma))
            if c.learn_sigma:
                self.log_sigma = nn.Parameter(init)
            else:
                self.register_buffer("log_sigma", init)

    @property
    def supports_kl_control(self) -> bool:  # type: ignore[override]
        """KL schedules and free bits act on the ELBO's KL term; the IWAE bound has none."""
        return self.config.objective == "elbo"

    # -- the probabilistic pieces ----------------------------------------------------------------
    def encode(self, x: torch.Tensor, y: Any = None) -> DiagonalGaussian:
        """q(z|x) for x (B, C, H, W): a DiagonalGaussian with mean and logvar (B, D). ``y`` is the
        condition of a conditional subclass; this family ignores it."""
        x = self.check_input(x)
        return self._encode(x, self._condition(y, x.shape[0]))

    def decode(self, z: torch.Tensor, y: Any = None
               ) -> BernoulliLikelihood | GaussianLikelihood | AutoregressiveBernoulli:
        """p(x|z) for z (..., B, D); extra leading dims of z are kept in the output. ``y`` as in encode."""
        z = self.check_latent(z)
        return self._decode(z, self._condition(y, z.shape[-2]))

    def _posterior_of_checked(self, x: torch.Tensor, y: Any) -> DiagonalGaussian:
        return self._encode(x, self._condition(y, x.shape[0]))

    def _condition(self, y: Any, batch: int) -> torch.Tensor | None:
        """The condition vectors (B, cond_size) the networks see, or None for an unconditional family."""
        return None

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        beta: float | None = None,
        kl_control: KLControl | None = None,
        check: bool = True,
    ) -> VAEOutput:
        """Negative ELBO of a batch x (B, C, H, W): one reparameterized sample per example.

        ``y`` (labels) is ignored by this family. ``beta`` overrides ``config.beta``;
        ``kl_control`` (schedules, free bits, capacity) overrides both. ``check=False`` skips
        the value-range check of x (a full pass over the batch); the trainer uses it after
        the first batch, since its loader only serves values in [0, 1].
        """
        x = self.check_input(x, values=check)
        if self.config.objective == "iwae":
            return self._iwae_output(x, None, beta, kl_control)
        control = kl_control or KLControl(weight=self.config.beta if beta is None else beta)
        return self._elbo_output(x, None, control)

    # -- the two training bounds (shared with subclasses; ``cond`` is None for this family) -----
    def _encode(self, x: torch.Tensor, cond: torch.Tensor | None) -> DiagonalGaussian:
        h = self.encoder(x)
        if cond is not None:
            h = torch.cat([h, cond], dim=1)
        return DiagonalGaussian(self.to_mean(h), self.to_logvar(h))

    def _decode(self, z: torch.Tensor, cond: torch.Tensor | None
                ) -> BernoulliLikelihood | GaussianLikelihood | AutoregressiveBernoulli:
        if cond is not None:  # a condition joins z at the decoder input
            z = torch.cat([z, cond.expand(*z.shape[:-1], cond.shape[-1])], dim=-1)
        if self.config.decoder == "pixelcnn":
            return AutoregressiveBernoulli(self.decoder, z, self.config.decoder_dropout, self.training)
        lead = z.shape[:-1]
        out = self.decoder(z.reshape(-1, z.shape[-1]))
        out = out.view(*lead, *self.config.input_shape)
        return self.likelihood_from(out)

    def _kl_per_dim(self, posterior: DiagonalGaussian, cond: torch.Tensor | None) -> torch.Tensor:
        """KL(q(z|x) || p(z)) per example and dimension, (B, D); a subclass with another prior overrides it."""
        return posterior.kl()

    def _elbo_output(self, x: torch.Tensor, cond: torch.Tensor | None, control: KLControl) -> VAEOutput:
        """One reparameterized sample per example; loss = recon + kl_term(KL per dim, control)."""
        posterior = self._encode(x, cond)
        z = posterior.rsample()
        recon_pe = -self._decode(z, cond).log_prob(x)  # (B,)
        kl_pd = self._kl_per_dim(posterior, cond)  # (B, D)
        kl_pe = kl_pd.sum(1)
        recon, kl, kl_dim = recon_pe.mean(), kl_pe.mean(), kl_pd.mean(0)
        term, kl_used = kl_term(kl_dim, control)
        return VAEOutput(
            loss=recon + term, recon=recon, kl=kl, kl_per_dim=kl_dim, kl_used=kl_used,
            recon_per_example=recon_pe, kl_per_example=kl_pe, z=z, posterior=posterior,
        )

    def _iwae_output(self, x: torch.Tensor, cond: torch.Tensor | None, beta: float | None,
                     kl_control: KLControl | None) -> VAEOutput:
        """loss = -L_k (batch mean); recon and kl are logged alongside (recon averaged over the k samples)."""
        if (beta is not None and beta != 1.0) or (kl_control is not None and kl_control != KLControl()):
            raise InputError(f"objective 'iwae' takes no KL weight, schedule or free bits; got beta={beta!r}, "
                             f"kl_control={kl_control!r}")
        t = importance_terms(self, x, self.config.iwae_k, cond)
        bound = iwae_bound(t.log_w)  # (B,)
        recon_pe = -t.log_px_z.mean(0)  # (B,)
        kl_pd = self._kl_per_dim(t.posterior, cond)  # (B, D), closed form, for logging
        kl_pe = kl_pd.sum(1)
        kl = kl_pe.mean()
        return VAEOutput(
            loss=-bound.mean(), recon=recon_pe.mean(), kl=kl, kl_per_dim=kl_pd.mean(0), kl_used=kl,
            recon_per_example=recon_pe, kl_per_example=kl_pe, z=t.z[0], posterior=t.posterior,
            iwae=bound.mean(),
        )

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, y: Any = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images (n, C, H, W): decoder means at z ~ N(0, I). ``y`` is ignored by this family."""
        self.check_count(n)
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=self.device) if generator is None \
            else torch.randn(n, self.config.latent_dim, generator=generator).to(self.device)
        return self._decode(z, None).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: Any = None) -> torch.Tensor:
        """Decoder mean at the posterior mean, (B, C, H, W). ``y`` as in encode."""
        x = self.check_input(x)
        cond = self._condition(y, x.shape[0])
        return self._decode(self._encode(x, cond).mean, cond).mean
