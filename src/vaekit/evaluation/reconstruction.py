"""Reconstruction quality: mean squared error and SSIM between inputs and the model's reconstructions.

SSIM is torchmetrics' implementation of Wang et al. (2004): an 11 x 11 Gaussian window with
sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1. torchmetrics extends each image by reflection and
averages the SSIM map over every pixel (scikit-image instead averages over the interior only, so
its numbers differ slightly on small images); then we average over images.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from vaekit.errors import InputError


def _check_pair(x: Any, x_hat: Any) -> None:
    for name, t in (("x", x), ("x_hat", x_hat)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4 or t.shape[0] == 0:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"{name} must be a non-empty image batch (N, C, H, W), got {got}")
        if not t.is_floating_point():
            raise InputError(f"{name} must be floats in [0, 1], got dtype {t.dtype}")
    if x.shape != x_hat.shape:
        raise InputError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")


def mse_per_image(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image, averaged over pixels: (N,) for images (N, C, H, W)."""
    _check_pair(x, x_hat)
    return (x.double() - x_hat.double()).pow(2).flatten(1).mean(1)


def ssim_per_image(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """SSIM of each reconstruction against its input, (N,), for images in [0, 1] at least 11 x 11."""
    _check_pair(x, x_hat)
    if min(x.shape[-2:]) < 11:
        raise InputError(f"SSIM needs images of at least 11 x 11 pixels (its window), got {tuple(x.shape[-2:])}")
    # float64: E[x^2] - E[x]^2 in float32 loses ~1e-4 of SSIM to cancellation on flat regions
    return structural_similarity_index_measure(x_hat.double(), x.double(), data_range=1.0, reduction="none")


class ReconstructionMetrics:
    """Accumulates MSE and SSIM over batches: ``update(x, x_hat)``, ``compute()``, ``reset()``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.mse: list[torch.Tensor] = []
        self.ssim: list[torch.Tensor] = []

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        self.mse.append(mse_per_image(x, x_hat).cpu())
        self.ssim.append(ssim_per_image(x, x_hat).cpu())

    def compute(self) -> dict[str, float | int]:
        """``mse`` (mean over pixels and images), ``ssim`` (mean over images), their standard errors, ``n``."""
        if not self.mse:
            raise InputError("ReconstructionMetrics.compute() called before any update()")
        mse, ssim = torch.cat(self.mse), torch.cat(self.ssim)
        n = mse.numel()

        def se(t: torch.Tensor) -> float:
            return t.std().item() / n**0.5 if n > 1 else float("nan")

        return {"mse": mse.mean().item(), "mse_stderr": se(mse), "ssim": ssim.mean().item(),
                "ssim_stderr": se(ssim), "n": n}


@torch.no_grad()
def reconstruction_metrics(model: Any, batches: Iterable[Any], max_examples: int | None = None) -> dict[str, Any]:
    """MSE and SSIM of ``model.reconstruct(x)`` against x over the batches ((x, y) pairs or tensors).

    Reconstructions are the model's own (for the Gaussian VAE the decoder mean at the posterior
    mean). Compare against the same inputs the model was evaluated on (binarized for Bernoulli
    models evaluated on binarized data).
    """
    acc = ReconstructionMetrics()
    seen = 0
    was = model.training
    model.eval()
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, tuple | list) else batch
            if max_examples is not None:
                x = x[: max_examples - seen]
            x = x.to(model.device)
            acc.update(x, model.reconstruct(x).clamp(0, 1))
            seen += x.shape[0]
            if max_examples is not None and seen >= max_examples:
                break
    finally:
        model.train(was)
    return dict(acc.compute())
