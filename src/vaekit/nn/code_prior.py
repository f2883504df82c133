"""An autoregressive prior over grids of code indices: a small causal transformer.

A (h, w) grid of indices in [0, K) is read in raster order as a sequence of L = h * w tokens.
The model sees a start token followed by the first L - 1 indices and predicts every index
from those before it:  log p(grid) = sum_l log p(k_l | k_<l). Used by the VQ-VAE, which is
trained first; the prior is then fitted to the index grids of the training set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaekit.errors import InputError


class CodePrior(nn.Module):
    """Causal transformer over ``length`` tokens from a vocabulary of ``num_codes``.

    Args:
        num_codes: K. length: L = h * w. dim: model width. layers, heads: transformer depth and heads.
        dropout: dropout inside the transformer layers (training only).
    """

    def __init__(self, num_codes: int, length: int, dim: int = 128, layers: int = 2, heads: int = 4,
                 dropout: float = 0.1):
        super().__init__()
        self.num_codes, self.length = num_codes, length
        self.tok = nn.Embedding(num_codes + 1, dim)  # index num_codes is the start token
        self.pos = nn.Parameter(torch.zeros(length, dim))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_codes)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)

    def _check(self, codes: torch.Tensor) -> None:
        if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int64 or codes.ndim != 2:
            got = f"{codes.dtype} {tuple(codes.shape)}" if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise InputError(f"codes must be an int64 tensor (B, {self.length}), got {got}")
        if codes.shape[1] > self.length:
            raise InputError(f"codes must hold at most {self.length} positions, got {codes.shape[1]}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise InputError(f"code indices must lie in [0, {self.num_codes - 1}], got "
                             f"[{int(codes.min())}, {int(codes.max())}]")

    def _run(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, m, K) for start-prefixed tokens (B, m), m <= L; row j predicts index j."""
        m = tokens.shape[1]
        h = self.tok(tokens) + self.pos[:m]
        h = self.body(h, mask=self.mask[:m, :m], is_causal=True)
        return self.head(self.norm(h))

    def _start(self, codes: torch.Tensor) -> torch.Tensor:
        start = torch.full((codes.shape[0], 1), self.num_codes, dtype=torch.int64, device=codes.device)
        return torch.cat([start, codes], dim=1)

    def logits(self, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, l, K) for ``codes`` (B, l): row j predicts codes[:, j] from codes[:, :j]."""
        self._check(codes)
        return self._run(self._start(codes)[:, : codes.shape[1]])

    def log_prob(self, codes: torch.Tensor) -> torch.Tensor:
        """log p(codes) per sequence, (B,), nats; ``codes`` (B, L)."""
        self._check(codes)
        if codes.shape[1] != self.length:
            raise InputError(f"codes must hold {self.length} positions, got {codes.shape[1]}")
        logp = F.log_softmax(self.logits(codes), dim=-1)  # (B, L, K)
        return logp.gather(-1, codes[..., None]).squeeze(-1).sum(1)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` index sequences (n, L) drawn position by position."""
        if not temperature > 0:
            raise InputError(f"temperature must be > 0, got {temperature!r}")
        device = self.pos.device
        codes = torch.zeros(n, 0, dtype=torch.int64, device=device)
        for _ in range(self.length):
            last = self._run(self._start(codes))[:, -1]  # (n, K): the next position
            probs = F.softmax(last.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)
            codes = torch.cat([codes, nxt], dim=1)
        return codes
