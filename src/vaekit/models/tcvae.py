"""beta-TCVAE (Chen et al. 2018): the VAE whose KL is split into three separately weighted terms.

loss = E_q[-log p(x|z)] + alpha * I_q(x; z) + beta * TC(z) + gamma * sum_d KL(q(z_d) || p(z_d)),
each term estimated on the minibatch by :func:`vaekit.objectives.tc.tc_decomposition` (MWS or
MSS), which needs N, the training-set size: the trainer supplies it through ``on_train_data``,
or set ``model.dataset_size``. alpha = beta = gamma = 1 is the plain VAE's loss (in expectation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vaekit.errors import ConfigError, InputError, check_choice, check_positive
from vaekit.models.base import register_model
from vaekit.models.vae import VAE, VAEConfig, VAEOutput
from vaekit.objectives.kl_control import KLControl
from vaekit.objectives.tc import ESTIMATORS, tc_decomposition


@dataclass
class TCVAEConfig(VAEConfig):
    """Hyper-parameters of :class:`TCVAE`: every VAEConfig field, with ``beta`` weighting the TC."""

    family: str = "tcvae"  # registry name; selects the model class when loading
    beta: float = 6.0  # weight of the total-correlation term (Chen et al. use 6 on dSprites)
    alpha: float = 1.0  # weight of the index-code mutual information I(x; z)
    gamma: float = 1.0  # weight of the dimension-wise KL
    estimator: Literal["mss", "mws"] = "mss"  # minibatch-stratified or minibatch-weighted sampling
    dataset_size: int = 0  # N for the estimators; 0: taken from the trainer (the training-split size)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective != "elbo":
            raise ConfigError(f"model.objective must be 'elbo' for tcvae (the decomposition splits the ELBO's KL), "
                              f"got {self.objective!r}")
        check_positive("model.alpha", self.alpha, allow_zero=True)
        check_positive("model.gamma", self.gamma, allow_zero=True)
        check_choice("model.estimator", self.estimator, ESTIMATORS)
        check_positive("model.dataset_size", self.dataset_size, allow_zero=True, integer=True)


@dataclass
class TCVAEOutput(VAEOutput):
    """VAEOutput plus the three KL terms (batch means, nats); ``kl`` stays the closed-form KL."""

    mi: torch.Tensor | None = None  # index-code mutual information (always set by TCVAE)
    tc: torch.Tensor | None = None  # total correlation
    dim_kl: torch.Tensor | None = None  # dimension-wise KL

    def terms(self) -> dict[str, torch.Tensor]:
        return {"loss": self.loss, "recon": self.recon, "kl": self.kl, "mi": self.mi, "tc": self.tc,
                "dim_kl": self.dim_kl}


@register_model("tcvae")
class TCVAE(VAE):
    """Gaussian VAE trained on the TC-decomposed ELBO."""

    config_class = TCVAEConfig

    def __init__(self, config: TCVAEConfig | None = None):
        super().__init__(config)
        # N as used by the estimators; saved with the weights so a loaded model evaluates alike.
        self.register_buffer("dataset_size", torch.tensor(self.config.dataset_size, dtype=torch.int64))

    @property
    def supports_kl_control(self) -> bool:  # type: ignore[override]
        return False  # the three terms carry their own weights; schedules act on a single KL term

    def on_train_data(self, n_train: int) -> None:
        if self.config.dataset_size == 0:
            self.dataset_size.fill_(int(n_train))

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        beta: float | None = None,
        kl_control: KLControl | None = None,
        check: bool = True,
    ) -> TCVAEOutput:
        """Loss of a batch x (B, C, H, W), B >= 2 for MSS. ``y`` is ignored; ``beta`` overrides the TC weight."""
        x = self.check_input(x, values=check)
        if kl_control is not None and kl_control != KLControl():
            raise InputError(f"tcvae takes no kl_control (its alpha, beta, gamma weight the KL terms), "
                             f"got {kl_control!r}")
        n = int(self.dataset_size)
        if n == 0:
            raise InputError("tcvae needs the training-set size: set model.dataset_size, or train with the Trainer "
                             "(it calls on_train_data)")
        if n < x.shape[0]:
            raise InputError(f"batch of {x.shape[0]} examples is larger than dataset_size {n}")
        c = self.config
        posterior = self._encode(x, None)
        z = posterior.rsample()
        recon_pe = -self._decode(z, None).log_prob(x)  # (B,)
        t = tc_decomposition(z, posterior.mean, posterior.logvar, n, c.estimator)
        mi, tc, dim_kl = t.mi.mean(), t.tc.mean(), t.dim_kl.mean()
        kl_pd = posterior.kl()  # (B, D) closed form, for logging and collapse monitors
        kl_pe = kl_pd.sum(1)
        recon, kl = recon_pe.mean(), kl_pe.mean()
        w_tc = c.beta if beta is None else beta
        loss = recon + c.alpha * mi + w_tc * tc + c.gamma * dim_kl
        return TCVAEOutput(
            loss=loss, recon=recon, kl=kl, kl_per_dim=kl_pd.mean(0), kl_used=mi + tc + dim_kl,
            recon_per_example=recon_pe, kl_per_example=kl_pe, z=z, posterior=posterior,
            mi=mi, tc=tc, dim_kl=dim_kl,
        )
