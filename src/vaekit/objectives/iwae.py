"""Importance-weighted bounds (Burda et al. 2015), shared by the IWAE objective and the NLL evaluation.

log p(x) >= L_k = E[ logsumexp_k( log p(x|z_k) + log p(z_k) - log q(z_k|x) ) - log k ],
z_k ~ q(z|x). L_1 is the ELBO; L_k tightens as k grows and tends to log p(x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from vaekit.errors import InputError


@dataclass
class ImportanceTerms:
    """The three parts of the log importance weights of k samples per example, each (k, B), nats."""

    log_px_z: torch.Tensor  # log p(x|z_k)
    log_pz: torch.Tensor  # log p(z_k)
    log_qz_x: torch.Tensor  # log q(z_k|x)
    z: torch.Tensor  # (k, B, D) the samples
    posterior: Any  # q(z|x), as returned by ``model.encode``

    @property
    def log_w(self) -> torch.Tensor:
        """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x): (k, B)."""
        return self.log_px_z + self.log_pz - self.log_qz_x


def importance_terms(model: Any, x: torch.Tensor, k: int, y: torch.Tensor | None = None) -> ImportanceTerms:
    """Draw k samples z_k ~ q(z|x) per example and return the parts of their log weights.

    ``model`` follows the model interface (``vaekit.models.base.BaseModel``) with
    ``defines_elbo``: ``encode(x, y)`` returns a posterior with ``rsample(n)`` and ``log_prob(z)``,
    ``decode(z, y)`` accepts extra leading sample dims, ``log_prior(z, y)`` is log p(z).
    Gradients flow (reparameterized), so this serves training as well as evaluation.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    q = model.encode(x, y)
    z = q.rsample(k)  # (k, B, D)
    log_px_z = model.decode(z, y).log_prob(x)  # (k, B)
    log_pz = model.log_prior(z, y)
    return ImportanceTerms(log_px_z, log_pz, q.log_prob(z), z, q)


def log_importance_weights(model: Any, x: torch.Tensor, k: int, y: torch.Tensor | None = None) -> torch.Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x) for k samples per example: (k, B).

    See :func:`importance_terms` for what ``model`` must provide.
    """
    return importance_terms(model, x, k, y).log_w


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """Per-example bound logsumexp_k(log w) - log k from log weights (k, B): (B,)."""
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])
