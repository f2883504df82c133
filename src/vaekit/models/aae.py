"""Adversarial Autoencoder (Makhzani et al. 2015): an autoencoder whose code is matched to a prior
by a discriminator on z instead of a KL term.

Each training step has two phases (three optimizer steps):

1. reconstruction: encoder and decoder minimise -log p(x|z)            (optimizer ``autoencoder``)
2. regularization: the discriminator learns to tell z ~ p(z) (label 1)
   from z = enc(x) (label 0)                                             (optimizer ``discriminator``)
   then the encoder learns to fool it: -log D(enc(x))                   (optimizer ``generator``)

Learning rates follow the two-time-scale rule (Heusel et al. 2017): 2e-4 for the autoencoder
and the generator, 1e-4 for the discriminator. Priors: ``normal`` N(0, I), ``mixture`` (K
Gaussians with means on a circle in the first two latent dimensions), or ``custom`` (any
sampler set with :meth:`AAE.set_prior_sampler`; code is never saved, so set it again after
loading). Logged for mode collapse: active latent units of the batch and the diversity of
decoded prior samples, beside the discriminator's loss and accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vaekit.errors import ConfigError, InputError, check_choice, check_positive
from vaekit.models.base import BaseModel, ModelOutput, check_class_labels, register_model
from vaekit.nn.distributions import BernoulliLikelihood, DiagonalGaussian, GaussianLikelihood
from vaekit.nn.layers import ACTIVATIONS, ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder, mlp


@dataclass
class AAEConfig:
    """Hyper-parameters of :class:`AAE`. Every field is validated on creation."""

    family: str = "aae"  # registry name; selects the model class when loading
    input_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W) of one image
    latent_dim: int = 8  # D, the size of z
    architecture: Literal["mlp", "conv"] = "mlp"  # encoder/decoder body
    hidden_sizes: tuple[int, ...] = (512, 512)  # MLP widths (encoder order; the decoder mirrors them)
    conv_channels: tuple[int, ...] = (32, 64)  # conv body: channels of each stride-2 layer
    activation: str = "relu"  # one of nn.layers.ACTIVATIONS
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"  # p(x|z) per pixel
    gaussian_sigma: float = 1.0  # Gaussian likelihood: fixed std
    encoder: Literal["deterministic", "gaussian"] = "deterministic"  # z = f(x), or z ~ N(mu(x), sigma(x)^2)
    prior: Literal["normal", "mixture", "custom"] = "normal"  # the distribution z is matched to
    mixture_components: int = 10  # mixture prior: components, means equally spaced on a circle
    mixture_radius: float = 4.0  # mixture prior: radius of that circle
    mixture_std: float = 0.5  # mixture prior: std of each component (every dimension)
    disc_hidden: tuple[int, ...] = (256, 256)  # discriminator MLP widths
    disc_steps: int = 1  # discriminator updates per training step (fresh prior samples each)
    # R1 penalty (Mescheder et al. 2018): disc_r1 / 2 * E_prior ||grad_z D(z)||^2 added to the
    # discriminator's loss; damps the oscillation of the adversarial game (0 = off)
    disc_r1: float = 0.0
    ae_lr: float = 2e-4  # Adam learning rate of the autoencoder (reconstruction phase)
    gen_lr: float | None = None  # Adam learning rate of the encoder in the generator phase (None: ae_lr)
    disc_lr: float = 1e-4  # Adam learning rate of the discriminator
    adam_betas: tuple[float, float] = (0.5, 0.999)  # Adam moment decay rates of all three optimizers
    diversity_samples: int = 16  # prior samples decoded each step for the sample-diversity monitor
    # Makhzani et al. Sec. 3: the discriminator also sees a one-hot label, the component of a prior
    # sample and the class of a code, so class c is matched to mixture component c (needs labels)
    label_guided: bool = False

    def __post_init__(self) -> None:
        if len(self.input_shape) != 3 or any(not isinstance(s, int) or s <= 0 for s in self.input_shape):
            raise ConfigError(f"model.input_shape must be three positive integers (C, H, W), got {self.input_shape!r}")
        check_positive("model.latent_dim", self.latent_dim, integer=True)
        check_choice("model.architecture", self.architecture, ("mlp", "conv"))
        check_choice("model.activation", self.activation, tuple(ACTIVATIONS))
        check_choice("model.likelihood", self.likelihood, ("bernoulli", "gaussian"))
        check_choice("model.encoder", self.encoder, ("deterministic", "gaussian"))
        check_choice("model.prior", self.prior, ("normal", "mixture", "custom"))
        for name in ("hidden_sizes", "conv_channels", "disc_hidden"):
            for h in getattr(self, name):
                check_positive(f"model.{name}[i]", h, integer=True)
        if not self.disc_hidden:
            raise ConfigError("model.disc_hidden must hold at least one width")
        if self.architecture == "conv" and not self.conv_channels:
            raise ConfigError("model.conv_channels must be non-empty for architecture 'conv'")
        check_positive("model.gaussian_sigma", self.gaussian_sigma)
        check_positive("model.mixture_components", self.mixture_components, integer=True)
        check_positive("model.mixture_radius", self.mixture_radius, allow_zero=True)
        check_positive("model.mixture_std", self.mixture_std)
        if self.prior == "mixture" and self.latent_dim < 2:
            raise ConfigError(f"model.prior 'mixture' needs model.latent_dim >= 2, got {self.latent_dim}")
        check_positive("model.disc_steps", self.disc_steps, integer=True)
        check_positive("model.disc_r1", self.disc_r1, allow_zero=True)
        check_positive("model.ae_lr", self.ae_lr)
        check_positive("model.disc_lr", self.disc_lr)
        if self.gen_lr is not None:
            check_positive("model.gen_lr", self.gen_lr)
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"model.adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        check_positive("model.diversity_samples", self.diversity_samples, integer=True)
        if self.label_guided and self.prior != "mixture":
            raise ConfigError(f"model.label_guided needs model.prior 'mixture' (one component per class), "
                              f"got prior {self.prior!r}")
        if self.diversity_samples < 2:
            raise ConfigError(f"model.diversity_samples must be >= 2, got {self.diversity_samples}")


@dataclass
class AAEOutput(ModelOutput):
    """Loss breakdown and monitors of one batch (batch means; recon in nats per example)."""

    disc_loss: torch.Tensor  # scalar: BCE of the discriminator on prior samples (1) and codes (0), summed
    gen_loss: torch.Tensor  # scalar: -log D(enc(x)), the encoder's adversarial loss
    disc_accuracy: torch.Tensor  # scalar: fraction of prior samples and codes the discriminator gets right
    active_units: torch.Tensor  # scalar: latent dims whose code varies over the batch (variance > 0.01)
    sample_diversity: torch.Tensor  # scalar: mean pairwise RMS pixel distance of decoded prior samples
    recon_per_example: torch.Tensor  # (B,): -log p(x|z)
    z: torch.Tensor  # (B, D) the codes

    def terms(self) -> dict[str, torch.Tensor]:
        return {"loss": self.loss, "recon": self.recon, "disc_loss": self.disc_loss, "gen_loss": self.gen_loss,
                "disc_accuracy": self.disc_accuracy, "active_units": self.active_units,
                "sample_diversity": self.sample_diversity}


class PointMass:
    """A deterministic code z = mean, with the posterior interface (``mean``, ``rsample``)."""

    def __init__(self, mean: torch.Tensor):
        self.mean = mean

    def rsample(self, n: int | None = None) -> torch.Tensor:
        return self.mean if n is None else self.mean.expand(n, *self.mean.shape)

    sample = rsample


def mixture_means(components: int, radius: float, dim: int) -> torch.Tensor:
    """(components, dim) means equally spaced on a circle of ``radius`` in the first two dims."""
    angle = 2 * math.pi * torch.arange(components, dtype=torch.float64) / components
    means = torch.zeros(components, dim, dtype=torch.float64)
    means[:, 0], means[:, 1] = radius * torch.cos(angle), radius * torch.sin(angle)
    return means.float()


def sample_diversity(images: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of the root-mean-square pixel difference of images (n, ...): 0 when all are equal."""
    flat = images.flatten(1)
    d = torch.cdist(flat, flat) / math.sqrt(flat.shape[1])  # (n, n) RMS distances
    n = flat.shape[0]
    return d.sum() / (n * (n - 1))


def _sync_grads(params: list[nn.Parameter]) -> None:
    """Average gradients over ranks (the phases bypass DDP's hooks, so they reduce their own)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


@register_model("aae")
class AAE(BaseModel):
    """Adversarial autoencoder with a deterministic or Gaussian encoder and a discriminator on z."""

    config_class = AAEConfig
    has_prior_sampler = True  # no ELBO: the prior need not have a density, so KL and the NLL do not apply
    custom_train_step = True

    def __init__(self, config: AAEConfig | None = None):
        config = self.resolve_config(config)
        super().__init__(config)
        c = config
        if c.architecture == "mlp":
            self.encoder = MLPEncoder(c.input_shape, c.hidden_sizes, c.activation)
            self.decoder = MLPDecoder(c.latent_dim, c.input_shape, c.hidden_sizes, c.activation)
        else:
            self.encoder = ConvEncoder(c.input_shape, c.conv_channels, c.hidden_sizes, c.activation)
            self.decoder = ConvDecoder(c.latent_dim, c.input_shape, c.conv_channels, c.hidden_sizes, c.activation)
        self.to_mean = nn.Linear(self.encoder.out_features, c.latent_dim)
        if c.encoder == "gaussian":
            self.to_logvar = nn.Linear(self.encoder.out_features, c.latent_dim)
        disc_in = c.latent_dim + (c.mixture_components if c.label_guided else 0)
        self.discriminator = nn.Sequential(mlp([disc_in, *c.disc_hidden], "leaky_relu", final_act=True),
                                           nn.Linear(c.disc_hidden[-1], 1))
        if c.likelihood == "gaussian":
            self.register_buffer("log_sigma", torch.full(c.input_shape, math.log(c.gaussian_sigma)))
        if c.prior == "mixture":
            self.register_buffer("mixture_means", mixture_means(c.mixture_components, c.mixture_radius,
                                                                c.latent_dim), persistent=False)
        self._sampler: Callable[[int], torch.Tensor] | None = None

    # -- parameter groups and optimizers -----------------------------------------------------------
    def encoder_parameters(self) -> list[nn.Parameter]:
        mods = [self.encoder, self.to_mean] + ([self.to_logvar] if self.config.encoder == "gaussian" else [])
        return [p for m in mods for p in m.parameters()]

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        return self.encoder_parameters() + list(self.decoder.parameters())

    def configure_optimizers(self, cfg: Any) -> dict[str, torch.optim.Optimizer]:
        """Three Adams with the model config's rates (``train.lr`` is not used by this family)."""
        c = self.config
        betas = tuple(c.adam_betas)
        return {
            "autoencoder": torch.optim.Adam(self.autoencoder_parameters(), lr=c.ae_lr, betas=betas),
            "generator": torch.optim.Adam(self.encoder_parameters(), lr=c.ae_lr if c.gen_lr is None else c.gen_lr,
                                          betas=betas),
            "discriminator": torch.optim.Adam(self.discriminator.parameters(), lr=c.disc_lr, betas=betas),
        }

    # -- prior ------------------------------------------------------------------------------------
    def set_prior_sampler(self, sampler: Callable[[int], torch.Tensor] | None) -> None:
        """Use ``sampler(n) -> (n, latent_dim)`` as the prior (config ``prior: custom``)."""
        if sampler is not None and not callable(sampler):
            raise InputError(f"sampler must be callable as sampler(n) -> (n, {self.config.latent_dim}), "
                             f"got {type(sampler).__name__}")
        self._sampler = sampler

    def sample_prior(self, n: int, generator: torch.Generator | None = None,
                     return_components: bool = False) -> Any:
        """``n`` draws z ~ p(z), (n, D); with ``return_components`` also the mixture component (n,) of each."""
        self.check_count(n)
        c, D = self.config, self.config.latent_dim
        comp = None
        if c.prior == "normal":
            z = torch.randn(n, D, generator=generator)
        elif c.prior == "mixture":
            comp = torch.randint(c.mixture_components, (n,), generator=generator)
            z = self.mixture_means.cpu()[comp] + c.mixture_std * torch.randn(n, D, generator=generator)
        else:
            if self._sampler is None:
                raise InputError("model.prior is 'custom' but no sampler is set: call model.set_prior_sampler(fn) "
                                 "(samplers are code and are not saved with the model)")
            z = self._sampler(n)
            if not isinstance(z, torch.Tensor) or tuple(z.shape) != (n, D):
                got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                raise InputError(f"the prior sampler must return a tensor ({n}, {D}), got {got}")
        z = z.to(self.device, torch.float32)
        return (z, comp.to(self.device) if comp is not None else None) if return_components else z

    # -- pieces -----------------------------------------------------------------------------------
    @property
    def gaussian_posterior(self) -> bool:  # type: ignore[override]
        """True with ``encoder: gaussian`` (q(z|x) is a DiagonalGaussian); a deterministic encoder gives a point."""
        return self.config.encoder == "gaussian"

    def encode(self, x: torch.Tensor, y: Any = None) -> PointMass | DiagonalGaussian:
        """The code distribution for x (B, C, H, W): a point mass or a DiagonalGaussian, mean (B, D).
        ``y`` is ignored (a label-guided AAE uses labels in its training terms only)."""
        return self._encode(self.check_input(x))

    def _posterior_of_checked(self, x: torch.Tensor, y: Any) -> PointMass | DiagonalGaussian:
        return self._encode(x)

    def _encode(self, x: torch.Tensor) -> PointMass | DiagonalGaussian:
        h = self.encoder(x)
        if self.config.encoder == "gaussian":
            return DiagonalGaussian(self.to_mean(h), self.to_logvar(h))
        return PointMass(self.to_mean(h))

    def decode(self, z: torch.Tensor, y: Any = None) -> BernoulliLikelihood | GaussianLikelihood:
        """p(x|z) for z (..., B, D); extra leading dims of z are kept. ``y`` is ignored."""
        return self._decode(self.check_latent(z))

    def _decode(self, z: torch.Tensor) -> BernoulliLikelihood | GaussianLikelihood:
        lead = z.shape[:-1]
        out = self.decoder(z.reshape(-1, z.shape[-1])).view(*lead, *self.config.input_shape)
        return self.likelihood_from(out)

    @property
    def uses_labels(self) -> bool:  # type: ignore[override]
        return self.config.label_guided

    def check_labels(self, y: Any, n: int) -> torch.Tensor:
        """Class labels (n,) in [0, mixture_components) for the label-guided regularization."""
        if y is None:
            raise InputError(f"a label-guided AAE needs integer class labels y of shape ({n},), got None")
        return check_class_labels(y, self.config.mixture_components, n).to(self.device)

    def _critic(self, z: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        """Discriminator logits (B,) for codes z (B, D); ``label`` (B,) is appended one-hot when label-guided."""
        if self.config.label_guided:
            z = torch.cat([z, F.one_hot(label, self.config.mixture_components).to(z.dtype)], dim=1)
        return self.discriminator(z).squeeze(1)

    def _disc_terms(self, z_fake: torch.Tensor, z_real: torch.Tensor, y_fake: torch.Tensor | None = None,
                    y_real: torch.Tensor | None = None, r1: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(discriminator BCE loss, accuracy) on prior samples (label 1) and codes (label 0); ``r1`` > 0
        adds the R1 gradient penalty r1 / 2 * mean ||grad_z D(z_real)||^2 to the loss."""
        if r1 > 0:
            z_real = z_real.detach().requires_grad_(True)
        real, fake = self._critic(z_real, y_real), self._critic(z_fake, y_fake)
        loss = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
        if r1 > 0:
            (grad,) = torch.autograd.grad(real.sum(), z_real, create_graph=True)
            loss = loss + 0.5 * r1 * grad.pow(2).sum(1).mean()
        acc = 0.5 * ((real > 0).float().mean() + (fake < 0).float().mean())
        return loss, acc.detach()

    def _gen_loss(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        logit = self._critic(z, y)
        return F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))

    @torch.no_grad()
    def _monitors(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        au = (z.detach().var(0, unbiased=False) > 0.01).sum().float() if z.shape[0] > 1 else z.new_zeros(())
        imgs = self._decode(self.sample_prior(self.config.diversity_samples)).mean
        return au, sample_diversity(imgs)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, check: bool = True) -> AAEOutput:
        """Every term at the current weights, without updating anything. ``y`` (class labels) is
        used by a label-guided AAE only, and required there.

        ``loss`` = recon + gen_loss is the autoencoder's objective; the
        discriminator's own objective is ``disc_loss``. Training uses :meth:`train_step`.
        """
        x = self.check_input(x, values=check)
        y = self.check_labels(y, x.shape[0]) if self.config.label_guided else None
        z = self._encode(x).rsample()
        recon_pe = -self._decode(z).log_prob(x)
        z_real, y_real = self.sample_prior(x.shape[0], return_components=True)
        d_loss, d_acc = self._disc_terms(z.detach(), z_real, y, y_real)
        g_loss = self._gen_loss(z, y)
        au, div = self._monitors(z)
        recon = recon_pe.mean()
        return AAEOutput(loss=recon + g_loss, recon=recon, disc_loss=d_loss,
                         gen_loss=g_loss, disc_accuracy=d_acc, active_units=au, sample_diversity=div,
                         recon_per_example=recon_pe, z=z)

    def train_step(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   optimizers: dict[str, torch.optim.Optimizer], forward_kwargs: dict[str, Any]) -> AAEOutput:
        """Reconstruction phase, then the regularization phase (discriminator step, generator step).

        ``net`` (possibly DDP-wrapped) is not called: each phase averages its own gradients over ranks.
        """
        x = self.check_input(x, values=forward_kwargs.get("check", True))
        y = self.check_labels(y, x.shape[0]) if self.config.label_guided else None
        ae, gen, disc = optimizers["autoencoder"], optimizers["generator"], optimizers["discriminator"]
        # 1. reconstruction
        ae.zero_grad(set_to_none=True)
        z = self._encode(x).rsample()
        recon_pe = -self._decode(z).log_prob(x)
        recon = recon_pe.mean()
        recon.backward()
        _sync_grads(self.autoencoder_parameters())
        ae.step()
        # 2a. regularization: the discriminator
        with torch.no_grad():
            z_fake = self._encode(x).rsample()
        for _ in range(self.config.disc_steps):
            disc.zero_grad(set_to_none=True)
            z_real, y_real = self.sample_prior(x.shape[0], return_components=True)
            d_loss, d_acc = self._disc_terms(z_fake, z_real, y, y_real, r1=self.config.disc_r1)
            d_loss.backward()
            _sync_grads(list(self.discriminator.parameters()))
            disc.step()
        # 2b. regularization: the encoder fools the discriminator
        gen.zero_grad(set_to_none=True)
        self.discriminator.requires_grad_(False)
        try:
            z = self._encode(x).rsample()
            g_loss = self._gen_loss(z, y)
            g_loss.backward()
        finally:
            self.discriminator.requires_grad_(True)
        _sync_grads(self.encoder_parameters())
        gen.step()
        au, div = self._monitors(z)
        return AAEOutput(loss=(recon + g_loss).detach(), recon=recon.detach(), disc_loss=d_loss.detach(),
                         gen_loss=g_loss.detach(), disc_accuracy=d_acc, active_units=au, sample_diversity=div,
                         recon_per_example=recon_pe.detach(), z=z.detach())

    # -- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, y: Any = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images (n, C, H, W): decoder means at z ~ p(z). ``y`` is ignored."""
        return self._decode(self.sample_prior(n, generator)).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: Any = None) -> torch.Tensor:
        """Decoder mean at the code's mean, (B, C, H, W)."""
        return self._decode(self.encode(x).mean).mean
