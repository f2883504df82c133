"""Conditional VAE (Sohn et al. 2015): q(z|x, c), p(x|z, c) and a prior p(z|c) or N(0, I).

The condition c is a class one-hot (``condition: class``; the trainer passes the labels) or a
user vector (``condition: vector``). It joins the encoder's features before the posterior heads
and z at the decoder's input. During training each example's condition is replaced by the null
condition (all zeros) with probability ``cond_dropout``: the model must then explain x through
z alone, so it cannot learn to ignore z, and it also learns unconditional generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from vaekit.errors import ConfigError, InputError, check_choice, check_positive
from vaekit.models.base import check_class_labels, register_model
from vaekit.models.vae import VAE, VAEConfig, VAEOutput
from vaekit.nn.distributions import DiagonalGaussian
from vaekit.nn.layers import mlp
from vaekit.objectives.kl import kl_normal
from vaekit.objectives.kl_control import KLControl
from vaekit.objectives.likelihoods import log_normal_diag, log_standard_normal


@dataclass
class CVAEConfig(VAEConfig):
    """Hyper-parameters of :class:`CVAE`: every VAEConfig field plus the condition."""

    family: str = "cvae"  # registry name; selects the model class when loading
    condition: Literal["class", "vector"] = "class"  # class labels (one-hot) or real-valued vectors
    num_classes: int = 10  # classes, for condition 'class'
    cond_dim: int = 0  # size of the condition vector, for condition 'vector'
    cond_dropout: float = 0.1  # training: probability of replacing an example's condition by the null one
    learned_prior: bool = False  # p(z|c) = N(mu(c), diag(sigma(c)^2)) from a small MLP instead of N(0, I)
    prior_hidden: tuple[int, ...] = (64,)  # widths of the learned prior's MLP

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("model.condition", self.condition, ("class", "vector"))
        if self.condition == "class":
            check_positive("model.num_classes", self.num_classes, integer=True)
            if self.num_classes < 2:
                raise ConfigError(f"model.num_classes must be >= 2, got {self.num_classes!r}")
        else:
            check_positive("model.cond_dim", self.cond_dim, integer=True)
        if not isinstance(self.cond_dropout, int | float) or not 0 <= self.cond_dropout < 1:
            raise ConfigError(f"model.cond_dropout must be in [0, 1), got {self.cond_dropout!r}")
        for h in self.prior_hidden:
            check_positive("model.prior_hidden[i]", h, integer=True)

    @property
    def cond_size(self) -> int:
        """Width of the condition vector fed to the networks."""
        return self.num_classes if self.condition == "class" else self.cond_dim


@register_model("cvae")
class CVAE(VAE):
    """Conditional Gaussian VAE; ``forward(x, y)`` needs the condition ``y``."""

    config_class = CVAEConfig
    conditional = True

    def __init__(self, config: CVAEConfig | None = None):
        config = self.resolve_config(config)
        super().__init__(config, cond_size=config.cond_size)
        if config.learned_prior:
            self.prior_net = mlp([config.cond_size, *config.prior_hidden, 2 * config.latent_dim],
                                 config.activation, final_act=False)

    # -- the condition -----------------------------------------------------------------------------
    def condition_vector(self, y: Any, batch: int | None = None) -> torch.Tensor:
        """Condition vectors (B, cond_size) from class labels (B,) int or vectors (B, cond_size) float.

        Float vectors are accepted for class conditioning too (soft labels, or zeros: the null condition).
        """
        c = self.config
        if not isinstance(y, torch.Tensor):
            raise InputError(f"the condition y must be a torch.Tensor: class labels (B,) int64 or vectors "
                             f"(B, {c.cond_size}) float, got {type(y).__name__}")
        if not y.is_floating_point():
            if c.condition != "class":
                raise InputError(f"condition 'vector' needs float vectors (B, {c.cond_size}), got dtype {y.dtype}")
            vec = F.one_hot(check_class_labels(y, c.num_classes), c.num_classes).to(self.to_mean.weight.dtype)
        else:
            if y.ndim != 2 or y.shape[1] != c.cond_size:
                raise InputError(f"condition vectors must have shape (B, {c.cond_size}), got {tuple(y.shape)}")
            vec = y.to(self.to_mean.weight.dtype)
        if batch is not None and vec.shape[0] != batch:
            raise InputError(f"the condition holds {vec.shape[0]} rows but x holds {batch} examples")
        return vec.to(self.to_mean.weight.device)

    def drop_condition(self, c: torch.Tensor) -> torch.Tensor:
        """In training mode, replace each row of c (B, cond_size) by the null condition with probability
        ``cond_dropout``; unchanged in eval mode."""
        if not self.training or self.config.cond_dropout == 0:
            return c
        keep = torch.rand(c.shape[0], 1, device=c.device) >= self.config.cond_dropout
        return c * keep

    def null_condition(self, n: int) -> torch.Tensor:
        """The null condition (zeros), (n, cond_size): what condition dropout feeds the networks."""
        return torch.zeros(n, self.config.cond_size, device=self.device)

    # -- the condition the networks see (encode/decode come from VAE) ------------------------------
    def _condition(self, y: Any, batch: int) -> torch.Tensor:
        """Condition vectors (B, cond_size) for ``y`` (labels or vectors); None gives the null condition."""
        return self.null_condition(batch) if y is None else self.condition_vector(y, batch)

    def kl_per_example(self, posterior: DiagonalGaussian, y: Any = None) -> torch.Tensor:
        """KL(q(z|x, c) || p(z|c)) per example, (B,) nats (the learned prior when the config has one)."""
        return self._kl_per_dim(posterior, self._condition(y, posterior.mean.shape[0])).sum(1)

    def prior(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of p(z|c), each (B, D); zeros for the standard-normal prior."""
        c = self.condition_vector(c)
        if not self.config.learned_prior:
            zeros = torch.zeros(c.shape[0], self.config.latent_dim, device=c.device, dtype=c.dtype)
            return zeros, zeros
        mean, logvar = self.prior_net(c).chunk(2, dim=-1)
        return mean, logvar

    def log_prior(self, z: torch.Tensor, y: Any = None) -> torch.Tensor:
        """log p(z|c) summed over D: z (..., B, D) -> (..., B). Used by the importance-weighted bound."""
        if not self.config.learned_prior:
            return log_standard_normal(z)
        mean, logvar = self.prior(self._condition(y, z.shape[-2]))
        return log_normal_diag(z, mean, logvar)

    def _kl_per_dim(self, posterior: DiagonalGaussian, cond: torch.Tensor | None) -> torch.Tensor:
        if not self.config.learned_prior:
            return posterior.kl()
        assert cond is not None
        mean, logvar = self.prior(cond)
        return kl_normal(posterior.mean, posterior.logvar, mean, logvar)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        beta: float | None = None,
        kl_control: KLControl | None = None,
        check: bool = True,
    ) -> VAEOutput:
        """Negative ELBO (or IWAE bound) of x (B, C, H, W) given its condition ``y``.

        ``y``: class labels (B,) int64 or condition vectors (B, cond_size). In training mode each
        example's condition is dropped (set to the null condition) with probability ``cond_dropout``.
        """
        x = self.check_input(x, values=check)
        if y is None:
            raise InputError(f"cvae needs the condition y: class labels (B,) int64 or vectors "
                             f"(B, {self.config.cond_size}) float")
        c = self.drop_condition(self.condition_vector(y, x.shape[0]))
        if self.config.objective == "iwae":
            return self._iwae_output(x, c, beta, kl_control)
        control = kl_control or KLControl(weight=self.config.beta if beta is None else beta)
        return self._elbo_output(x, c, control)

    # -- generation ------------------------------------------------------------------------------
    def _sample_condition(self, n: int, c: Any, generator: torch.Generator | None) -> torch.Tensor:
        if c is None:
            if self.config.condition == "class":  # a mixture over classes: p(x) = sum_c p(c) p(x|c), p(c) uniform
                labels = torch.randint(self.config.num_classes, (n,), generator=generator)
                return self.condition_vector(labels)
            return self.null_condition(n)
        if isinstance(c, int) and not isinstance(c, bool):
            if self.config.condition != "class":
                raise InputError(f"an integer condition needs condition 'class', this model has "
                                 f"{self.config.condition!r}")
            return self.condition_vector(torch.full((n,), c, dtype=torch.long))
        return self.condition_vector(c, n)

    @torch.no_grad()
    def sample(self, n: int, y: Any = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images (n, C, H, W) for condition ``y``: a class index (int), labels (n,), vectors
        (n, cond_size), or None (class conditioning: uniformly drawn classes; vectors: the null condition)."""
        self.check_count(n)
        cond = self._sample_condition(n, y, generator)
        mean, logvar = self.prior(cond)
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        return self._decode(mean + torch.exp(0.5 * logvar) * eps, cond).mean
