"""ELBO pieces as pure functions of tensors (nats throughout)."""

from vaekit.objectives.kl import kl_normal, kl_standard_normal
from vaekit.objectives.likelihoods import (
    LOG_2PI,
    bernoulli_log_prob,
    gaussian_log_prob,
    log_normal_diag,
    log_standard_normal,
)

__all__ = [
    "LOG_2PI", "bernoulli_log_prob", "gaussian_log_prob", "kl_normal", "kl_standard_normal",
    "log_normal_diag", "log_standard_normal",
]
