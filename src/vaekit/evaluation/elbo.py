"""The ELBO breakdown of a model on a dataset split."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from vaekit.errors import InputError
from vaekit.models.base import BaseModel


@torch.no_grad()
def evaluate_elbo(
    model: BaseModel,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Average loss terms over every example served by ``batches``.

    One reparameterized sample per example, drawn from a generator forked from
    ``seed`` so the caller's RNG stream is untouched (training stays reproducible)
    and repeated evaluations agree. Returns per-example means in nats:
    ``neg_elbo`` = recon + KL (beta = 1), ``loss`` (the model's own weighting),
    ``recon``, ``kl``, ``kl_per_dim`` (list of D floats), and ``n``.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    kl_dim: torch.Tensor | None = None
    n = 0
    device = model.device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for x, y in batches:
            cast = autocast_dtype is not None
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=cast):
                out = model(x, y=y) if model.uses_labels else model(x)
            b = x.shape[0]
            for name, value in out.terms().items():
                sums[name] = sums.get(name, 0.0) + value.detach().double() * b
            if model.defines_elbo:  # its output carries the KL of every latent dimension
                kl_dim = (kl_dim if kl_dim is not None else 0.0) + out.kl_per_dim.detach().double() * b
            n += b
    model.train(was_training)
    if n == 0:
        raise InputError("evaluate_elbo received no batches")
    result: dict[str, Any] = {k: (v / n).item() for k, v in sums.items()}
    if "kl" in result:
        result["neg_elbo"] = result["recon"] + result["kl"]
    if kl_dim is not None:
        result["kl_per_dim"] = (kl_dim / n).tolist()
    result["n"] = n
    return result
