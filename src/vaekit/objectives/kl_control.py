"""How the KL term enters the loss: weight (beta or a schedule), free bits, a total floor, capacity.

Every Gaussian-posterior family builds its loss as ``recon + kl_term(kl_per_dim, control)``,
so the trainer's schedules and collapse remedies work for all of them alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vaekit.errors import ConfigError


@dataclass(frozen=True)
class KLControl:
    """The KL part of one step's loss.

    weight: multiplies the KL term (beta, or a scheduled value).
    free_bits: lambda in nats per latent dimension; the term becomes
        sum_j max(lambda, E_batch[KL_j]) (Kingma et al. 2016, Eq. 15). 0 disables it.
    kl_floor: total-KL target in nats; the term becomes max(KL, kl_floor). 0 disables it.
    capacity: C(t) in nats; when set the term is ``gamma * |KL - C|`` (Burgess et al. 2018)
        and ``weight`` is ignored.
    gamma: weight of the capacity term.
    """

    weight: float = 1.0
    free_bits: float = 0.0
    kl_floor: float = 0.0
    capacity: float | None = None
    gamma: float = 1.0

    def __post_init__(self) -> None:
        for name in ("weight", "free_bits", "kl_floor", "gamma"):
            v = getattr(self, name)
            if not v >= 0:
                raise ConfigError(f"KLControl.{name} must be >= 0, got {v!r}")
        if self.capacity is not None and not self.capacity >= 0:
            raise ConfigError(f"KLControl.capacity must be >= 0 or None, got {self.capacity!r}")


def kl_term(kl_per_dim: torch.Tensor, control: KLControl) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss term, the KL as optimized) from the batch-mean KL per dimension (D,), nats.

    The second value is the KL after free bits and floor (what the optimizer sees), for
    logging beside the true KL.
    """
    kl = kl_per_dim.clamp(min=control.free_bits).sum() if control.free_bits > 0 else kl_per_dim.sum()
    if control.kl_floor > 0:
        kl = kl.clamp(min=control.kl_floor)
    if control.capacity is not None:
        return control.gamma * (kl - control.capacity).abs(), kl
    return control.weight * kl, kl
