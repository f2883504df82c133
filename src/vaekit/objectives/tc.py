"""The KL decomposition of beta-TCVAE (Chen et al. 2018), as pure functions of one minibatch.

With q(z) = (1/N) sum_n q(z|x_n) the aggregate posterior over a dataset of N examples,
the expected KL of the ELBO splits into three terms (Chen et al., Eq. 2):

    E_x KL(q(z|x) || p(z)) = I_q(x; z)                    index-code mutual information
                           + KL(q(z) || prod_d q(z_d))    total correlation
                           + sum_d KL(q(z_d) || p(z_d))   dimension-wise KL

Each term is an expectation over z ~ q(z|x) of differences of log densities. log q(z) and
log q(z_d) need the whole dataset; two minibatch estimators replace the sum over N by a sum
over the M examples of the batch, reusing every sample z_i against every posterior q(.|x_j):

* ``mws``, minibatch-weighted sampling: log q(z_i) ~ logsumexp_j log q(z_i|x_j) - log(N M).
  This is the paper's formula. Its inner sum is not an unbiased estimate of q(z_i) (the weight
  1/(NM) is exact only for the impossible case of batches drawn from outside the data), so the
  logged terms carry a bias: on a full batch (M = N) log q(z) comes out exactly log N too low
  and TC exactly (D - 1) log N too high. Chen et al. train with it all the same; read its
  logged terms as relative values, not absolute ones.
* ``mss``, minibatch-stratified sampling (paper, Appendix C.2): q(z_i) ~ sum_j W_ij q(z_i|x_j)
  with W_ii = 1/N, one other entry (N - M')/(N M') and the remaining M' - 1 entries 1/M',
  M' = M - 1. Each row sums to 1 and the inner sum is an unbiased estimate of q(z_i) (tested
  by enumerating every batch on a tiny dataset), so a factorized aggregate posterior gives
  TC ~ 0. Chen et al.'s reference code places the special entry of the last two rows wrongly
  (one row gets two, one none); here row i's special entry is column (i + 1) mod M.

All values are nats per example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from vaekit.errors import InputError, check_choice
from vaekit.objectives.likelihoods import LOG_2PI, log_standard_normal

Estimator = Literal["mws", "mss"]
ESTIMATORS = ("mws", "mss")


@dataclass
class TCTerms:
    """Per-example (M,) terms of the decomposition, nats. ``mi + tc + dim_kl`` is the
    Monte Carlo estimate log q(z|x) - log p(z) of the KL at the same samples."""

    mi: torch.Tensor  # log q(z|x) - log q(z)
    tc: torch.Tensor  # log q(z) - sum_d log q(z_d)
    dim_kl: torch.Tensor  # sum_d log q(z_d) - log p(z)
    log_qz: torch.Tensor  # estimated log q(z)
    log_prod_qz: torch.Tensor  # estimated sum_d log q(z_d)


def _check_batch(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> None:
    for name, t in (("z", z), ("mean", mean), ("logvar", logvar)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"{name} must be a tensor (M, D), got {got}")
    if not (z.shape == mean.shape == logvar.shape):
        raise InputError(f"z, mean and logvar must share one shape (M, D), got {tuple(z.shape)}, "
                         f"{tuple(mean.shape)}, {tuple(logvar.shape)}")


def pairwise_log_density(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log q(z_i,d | x_j) for every sample i, posterior j and dimension d: (M, M, D).

    ``z``: samples (M, D), z_i ~ q(z|x_i); ``mean``, ``logvar``: the posteriors (M, D).
    """
    _check_batch(z, mean, logvar)
    zi = z[:, None, :]  # (M, 1, D)
    return -0.5 * ((zi - mean[None]).pow(2) * torch.exp(-logvar[None]) + logvar[None] + LOG_2PI)


def mss_log_weights(batch_size: int, dataset_size: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """log W of minibatch-stratified sampling, (M, M); every row of W sums to 1 (see module doc)."""
    M, N = batch_size, dataset_size
    if isinstance(M, bool) or not isinstance(M, int) or M < 2:
        raise InputError(f"minibatch-stratified sampling needs a batch of at least 2 examples, got {M!r}")
    if isinstance(N, bool) or not isinstance(N, int) or N < M:
        raise InputError(f"dataset_size must be an integer >= the batch size ({M}), got {N!r}")
    m = M - 1  # the other examples of the batch
    W = torch.full((M, M), 1.0 / m, dtype=torch.float64)
    idx = torch.arange(M)
    W[idx, idx] = 1.0 / N
    W[idx, (idx + 1) % M] = (N - m) / (N * m)
    return W.log().to(dtype=dtype, device=device)


def log_aggregate_posterior(
    log_q: torch.Tensor, dataset_size: int, estimator: Estimator = "mss"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q(z_i), sum_d log q(z_i,d)), each (M,), from the pairwise log densities (M, M, D)."""
    check_choice("estimator", estimator, ESTIMATORS)
    if not isinstance(log_q, torch.Tensor) or log_q.ndim != 3 or log_q.shape[0] != log_q.shape[1]:
        got = tuple(log_q.shape) if isinstance(log_q, torch.Tensor) else type(log_q).__name__
        raise InputError(f"log_q must be a tensor (M, M, D), got {got}")
    M = log_q.shape[0]
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < M:
        raise InputError(f"dataset_size must be an integer >= the batch size ({M}), got {dataset_size!r}")
    if estimator == "mws":
        norm = math.log(dataset_size * M)
        log_qz = torch.logsumexp(log_q.sum(2), dim=1) - norm
        log_prod = (torch.logsumexp(log_q, dim=1) - norm).sum(1)
        return log_qz, log_prod
    log_w = mss_log_weights(M, dataset_size, log_q.dtype, log_q.device)  # (M, M)
    log_qz = torch.logsumexp(log_w + log_q.sum(2), dim=1)
    log_prod = torch.logsumexp(log_w[:, :, None] + log_q, dim=1).sum(1)
    return log_qz, log_prod


def tc_decomposition(
    z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, dataset_size: int, estimator: Estimator = "mss"
) -> TCTerms:
    """Mutual information, total correlation and dimension-wise KL per example, (M,) each.

    ``z`` (M, D): one sample per example from q(z|x_i) = N(mean_i, diag(exp(logvar_i)));
    ``dataset_size``: N, the number of training examples the batch was drawn from;
    ``estimator``: ``mss`` or ``mws``. The prior is N(0, I).
    """
    log_q = pairwise_log_density(z, mean, logvar)  # (M, M, D)
    log_qz, log_prod = log_aggregate_posterior(log_q, dataset_size, estimator)
    log_qz_x = torch.diagonal(log_q, dim1=0, dim2=1).sum(0)  # (M,): log q(z_i | x_i)
    log_pz = log_standard_normal(z)
    return TCTerms(mi=log_qz_x - log_qz, tc=log_qz - log_prod, dim_kl=log_prod - log_pz,
                   log_qz=log_qz, log_prod_qz=log_prod)
