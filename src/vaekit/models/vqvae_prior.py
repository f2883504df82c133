"""Fitting the VQ-VAE's code prior: encode the training set to index grids, then maximum likelihood.

Runs after the VQ-VAE is trained (its codebook fixed). The prior is a plain next-index classifier
(cross-entropy, nats per grid), trained with Adam; the VQ-VAE itself is not changed.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from vaekit.data.dataset import Binarize, ImageSplit, eval_loader, mix_seed
from vaekit.errors import InputError
from vaekit.models.vqvae import VQVAE


@torch.no_grad()
def encode_codes(model: VQVAE, split: ImageSplit, *, binarize: Binarize = "none", seed: int = 0,
                 batch_size: int = 500) -> torch.Tensor:
    """Index grids of every image of ``split`` as sequences (N, h * w) int64, in raster order.

    ``binarize``: the data setting the VQ-VAE was trained with (binarized data uses one fixed draw).
    """
    if not isinstance(model, VQVAE):
        raise InputError(f"model must be a VQVAE, got {type(model).__name__}")
    if not isinstance(split, ImageSplit):
        raise InputError(f"split must be an ImageSplit, got {type(split).__name__}")
    was = model.training
    model.eval()
    out = [model.encode(x).flatten(1).cpu() for x, _ in
           eval_loader(split, batch_size, binarize, seed, model.device).epoch(0)]
    model.train(was)
    return torch.cat(out)


@torch.no_grad()
def prior_nll(model: VQVAE, codes: torch.Tensor, batch_size: int = 1000) -> float:
    """Mean -log p(codes) under the prior, nats per grid."""
    was = model.prior.training
    model.prior.eval()
    total = 0.0
    for i in range(0, codes.shape[0], batch_size):
        total -= float(model.prior.log_prob(codes[i : i + batch_size].to(model.device)).sum())
    model.prior.train(was)
    return total / codes.shape[0]


def train_code_prior(
    model: VQVAE,
    train: ImageSplit,
    *,
    test: ImageSplit | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    binarize: Binarize = "none",
    max_steps: int | None = None,
    time_budget_s: float | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Fit ``model.prior`` to the index grids of ``train``; marks the prior trained and returns a history.

    Stops after ``epochs`` passes, ``max_steps`` steps or ``time_budget_s`` seconds, whichever comes
    first. ``log``: a callable given one dict per epoch (e.g. ``print``). Returns per-epoch train
    and test NLL (nats per grid; bits per index in ``test_bits_per_index``), steps and seconds.
    """
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    if not lr > 0:
        raise InputError(f"lr must be > 0, got {lr!r}")
    t0 = time.perf_counter()
    train_codes = encode_codes(model, train, binarize=binarize, seed=seed)
    test_codes = encode_codes(model, test, binarize=binarize, seed=seed) if test is not None else None
    g = torch.Generator().manual_seed(mix_seed(seed, 0x9A10))
    opt = torch.optim.Adam(model.prior.parameters(), lr=lr)
    history: dict[str, Any] = {"train_nll": [], "test_nll": [], "steps": 0}
    model.prior.train()
    steps, stop = 0, False
    for epoch in range(epochs):
        perm = torch.randperm(train_codes.shape[0], generator=g)
        total, n = 0.0, 0
        for i in range(0, len(perm), batch_size):
            codes = train_codes[perm[i : i + batch_size]].to(model.device)
            logits = model.prior.logits(codes)  # (B, L, K)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1), reduction="sum")
            opt.zero_grad(set_to_none=True)
            (loss / codes.numel()).backward()
            opt.step()
            total, n, steps = total + loss.item(), n + codes.shape[0], steps + 1
            if (max_steps is not None and steps >= max_steps) or (
                    time_budget_s is not None and time.perf_counter() - t0 > time_budget_s):
                stop = True
                break
        record = {"epoch": epoch + 1, "steps": steps, "train_nll": total / max(n, 1)}
        history["train_nll"].append(record["train_nll"])
        if test_codes is not None:
            record["test_nll"] = prior_nll(model, test_codes)
            history["test_nll"].append(record["test_nll"])
        if log is not None:
            log(record)
        if stop:
            break
    model.prior.eval()
    model.prior_trained.fill_(True)
    history["steps"] = steps
    history["seconds"] = time.perf_counter() - t0
    if history["test_nll"]:
        history["test_bits_per_index"] = history["test_nll"][-1] / (math.log(2) * train_codes.shape[1])
    return history
