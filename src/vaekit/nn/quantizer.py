"""Vector quantization with a codebook (van den Oord et al. 2017), EMA or loss-trained.

Each encoder output vector z_e (D,) is replaced by its nearest codebook entry e_k; the decoder
sees z_e + sg(e_k - z_e), so its gradient passes straight through to the encoder. The
codebook is trained either

* by exponential moving averages (``ema``; Appendix A.1 of the paper): with n_k the number
  of vectors assigned to code k in the batch and s_k their sum,
      N_k <- decay N_k + (1 - decay) n_k,     m_k <- decay m_k + (1 - decay) s_k,
      e_k  = m_k / N~_k,  N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j  (Laplace smoothing),
  N starts at 1 and m at the initial codebook, so an unused code stays where it is; or
* by the codebook loss ||sg(z_e) - e_k||^2 (``loss``), the codebook then being a parameter.

Dead-code restart: a code unused for ``dead_code_steps`` training steps is moved onto a random
encoder output of the current batch. Optional k-means initialisation fits the codebook to the
first training batch. Under torch.distributed the batch counts and sums are all-reduced before
the EMA update, and rank 0's restart and k-means choices are broadcast, so every rank keeps the
same codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vaekit.errors import InputError


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass
class Quantized:
    """The result of quantizing a batch of vectors."""

    z_q: torch.Tensor  # (N, D) straight-through output: the codes' values, the encoder's gradient
    codes: torch.Tensor  # (N, D) the selected codebook entries (gradient to the codebook in 'loss' mode)
    indices: torch.Tensor  # (N,) int64 nearest-code indices
    counts: torch.Tensor  # (K,) assignments per code in this batch (all ranks summed in training)
    dead_codes: int  # codes unused for dead_code_steps steps, counted before this step's restarts


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row (squared Euclidean distance) for each row of z: (N, D) -> (N,)."""
    dist2 = z.pow(2).sum(1, keepdim=True) - 2 * z @ codebook.t() + codebook.pow(2).sum(1)[None]  # (N, K)
    return dist2.argmin(1)


def ema_update(
    ema_count: torch.Tensor, ema_sum: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor,
    decay: float, eps: float,
) -> torch.Tensor:
    """One EMA step in place on ``ema_count`` (K,) and ``ema_sum`` (K, D); returns the new codebook (K, D)."""
    ema_count.mul_(decay).add_(counts, alpha=1 - decay)
    ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
    n = ema_count.sum()
    smoothed = (ema_count + eps) / (n + ema_count.numel() * eps) * n
    return ema_sum / smoothed[:, None]


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Lloyd's k-means on rows of x (N, D) from k rows drawn at random: centres (k, D).

    An empty cluster keeps its previous centre.
    """
    n = x.shape[0]
    pick = torch.randperm(n, generator=generator)[:k] if n >= k else torch.randint(n, (k,), generator=generator)
    centres = x[pick.to(x.device)].clone()
    for _ in range(iters):
        idx = nearest_code(x, centres)
        counts = torch.bincount(idx, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, idx, x)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return centres


class VectorQuantizer(nn.Module):
    """Codebook of K entries of size D with nearest-neighbour quantization.

    Args:
        num_codes: K. code_dim: D.
        update: ``ema`` (codebook is a buffer moved by moving averages) or ``loss`` (a parameter).
        decay, eps: EMA decay and Laplace-smoothing constant.
        dead_code_steps: a code unused for this many training steps counts as dead.
        restart_dead_codes: move dead codes onto recent encoder outputs.
        kmeans_init: fit the codebook with ``kmeans_iters`` k-means iterations on the first training batch.
    """

    def __init__(self, num_codes: int, code_dim: int, *, update: str = "ema", decay: float = 0.99,
                 eps: float = 1e-5, dead_code_steps: int = 100, restart_dead_codes: bool = True,
                 kmeans_init: bool = False, kmeans_iters: int = 10):
        super().__init__()
        self.num_codes, self.code_dim, self.update = num_codes, code_dim, update
        self.decay, self.eps = decay, eps
        self.dead_code_steps, self.restart_dead_codes = dead_code_steps, restart_dead_codes
        self.kmeans_iters = kmeans_iters
        if update == "ema":
            init = torch.randn(num_codes, code_dim)
            self.register_buffer("codebook", init)
            self.register_buffer("ema_count", torch.ones(num_codes))
            self.register_buffer("ema_sum", init.clone())
        else:
            self.codebook = nn.Parameter(torch.empty(num_codes, code_dim).uniform_(-1 / num_codes, 1 / num_codes))
        self.register_buffer("steps_unused", torch.zeros(num_codes, dtype=torch.int64))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    # -- state changes (training only) ---------------------------------------------------------------
    @torch.no_grad()
    def _set_codes(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Place codes ``rows`` (bool mask (K,)) at ``values`` (n, D), resetting their EMA statistics."""
        self.codebook.data[rows] = values
        if self.update == "ema":
            self.ema_sum[rows] = values
            self.ema_count[rows] = 1.0
        self.steps_unused[rows] = 0

    @torch.no_grad()
    def _kmeans_init(self, z: torch.Tensor) -> None:
        centres = kmeans(z.detach(), self.num_codes, self.kmeans_iters)
        if _distributed():
            dist.broadcast(centres, src=0)
        self._set_codes(torch.ones(self.num_codes, dtype=torch.bool, device=z.device), centres)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _restart(self, dead: torch.Tensor, z: torch.Tensor) -> None:
        n_dead, n = int(dead.sum()), z.shape[0]
        if n >= n_dead:  # distinct encoder outputs when the batch has enough
            pick = torch.randperm(n, device=z.device)[:n_dead]
        else:
            pick = torch.randint(n, (n_dead,), device=z.device)
        values = z.detach()[pick].clone()
        if _distributed():
            dist.broadcast(values, src=0)
        self._set_codes(dead, values)

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> Quantized:
        """Quantize rows of z (N, D). In training mode also update the codebook state (after lookup).

        Runs in the codebook's dtype (float32 unless the model was cast) whatever the autocast
        context (z is cast; gradients flow back through the cast): under bf16 the EMA statistics
        would round (bf16 holds integers exactly only to 256) and restarted or k-means codes could
        not be written into the float32 codebook."""
        if z.ndim != 2 or z.shape[1] != self.code_dim:
            raise InputError(f"vectors to quantize must have shape (N, {self.code_dim}), got {tuple(z.shape)}")
        with torch.autocast(z.device.type, enabled=False):
            return self._quantize(z.to(self.codebook.dtype))

    def _quantize(self, z: torch.Tensor) -> Quantized:
        if self.training and not bool(self.initialized):
            self._kmeans_init(z)
        indices = nearest_code(z.detach(), self.codebook.detach())
        codes = F.embedding(indices, self.codebook)  # (N, D); carries the codebook gradient in 'loss' mode
        z_q = z + (codes - z).detach()  # straight-through estimator
        counts = torch.bincount(indices, minlength=self.num_codes).to(z.dtype)
        dead_codes = int((self.steps_unused >= self.dead_code_steps).sum())
        if self.training:
            counts = self._update(z.detach(), indices, counts)
            dead = self.steps_unused >= self.dead_code_steps
            dead_codes = int(dead.sum())
            if self.restart_dead_codes and dead_codes:
                self._restart(dead, z)
        return Quantized(z_q=z_q, codes=codes, indices=indices, counts=counts, dead_codes=dead_codes)

    @torch.no_grad()
    def _update(self, z: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """EMA step (in 'ema' mode) and usage bookkeeping; returns the counts summed over ranks."""
        sums = torch.zeros(self.num_codes, self.code_dim, dtype=z.dtype, device=z.device).index_add_(0, indices, z)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        if self.update == "ema":
            self.codebook.copy_(ema_update(self.ema_count, self.ema_sum, counts, sums, self.decay, self.eps))
        self.steps_unused.add_(1)
        self.steps_unused[counts > 0] = 0
        return counts


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(H(p)) of the code-usage distribution p = counts / sum(counts): 1 (one code) .. K (uniform)."""
    p = counts / counts.sum().clamp(min=1)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())


def usage_fraction(counts: torch.Tensor) -> torch.Tensor:
    """Fraction of the K codes used at least once."""
    return (counts > 0).to(counts.dtype).mean()

