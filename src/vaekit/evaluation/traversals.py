"""Pictures of a model: samples, inputs above reconstructions, interpolations, latent traversals.

Each function returns an image tensor (N, C, H, W) in [0, 1] laid out for
:func:`vaekit.evaluation.images.make_grid` with the ``nrow`` it documents, so callers can save or
embed it. Decoded images are the likelihood's ``mean`` (for the Gaussian VAE the decoder mean;
for an autoregressive decoder, see its likelihood).
"""

from __future__ import annotations

from typing import Any

import torch

from vaekit.errors import InputError, describe


def _check_images(model: Any, x: Any, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[0] == 0:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{name} must be a non-empty image batch (N, C, H, W), got {got}")
    if tuple(x.shape[1:]) != tuple(model.input_shape):
        raise InputError(f"{name} images have shape {tuple(x.shape[1:])}, the model expects {tuple(model.input_shape)}")
    return x.to(model.device)


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {describe(value)}")
    return value


@torch.no_grad()
def reconstruction_rows(model: Any, x: torch.Tensor, per_row: int = 8) -> torch.Tensor:
    """Inputs and reconstructions in alternating rows of ``per_row``: use ``nrow=per_row``."""
    x = _check_images(model, x)
    _check_int("per_row", per_row, 1)
    recon = model.reconstruct(x).clamp(0, 1)
    rows = []
    for i in range(0, x.shape[0], per_row):
        rows += [x[i : i + per_row], recon[i : i + per_row]]
    return torch.cat(rows).cpu()


@torch.no_grad()
def interpolations(model: Any, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Decoded images along the straight line between the posterior means of x_a[i] and x_b[i].

    Returns (pairs * steps, C, H, W): one row per pair, from x_a to x_b; use ``nrow=steps``.
    """
    x_a, x_b = _check_images(model, x_a, "x_a"), _check_images(model, x_b, "x_b")
    if x_a.shape != x_b.shape:
        raise InputError(f"x_a and x_b must hold the same number of images, got {x_a.shape[0]} and {x_b.shape[0]}")
    _check_int("steps", steps, 2)
    z_a, z_b = model.encode(x_a).mean, model.encode(x_b).mean  # (P, D)
    t = torch.linspace(0, 1, steps, device=z_a.device)[None, :, None]  # (1, S, 1)
    z = z_a[:, None] * (1 - t) + z_b[:, None] * t  # (P, S, D)
    images = model.decode(z.reshape(-1, z.shape[-1])).mean
    return images.clamp(0, 1).cpu()


def dims_by_kl(kl_per_dim: Any, top: int | None = None) -> list[int]:
    """Latent dimensions sorted by decreasing average KL (the most informative first), the ``top`` ones."""
    kl = torch.as_tensor(kl_per_dim, dtype=torch.float64)
    if kl.ndim != 1 or kl.numel() == 0:
        raise InputError(f"kl_per_dim must be a non-empty list of per-dimension KL values, got {describe(kl_per_dim)}")
    order = torch.argsort(kl, descending=True).tolist()
    return order[:top] if top is not None else order


@torch.no_grad()
def traversals(model: Any, x: torch.Tensor, dims: list[int], span: float = 3.0, steps: int = 9) -> torch.Tensor:
    """Latent traversals: for each dim in ``dims``, decode the posterior mean of x[0] with that dim
    set to ``steps`` values evenly spaced in [-span, span] (prior standard deviations).

    Returns (len(dims) * steps, C, H, W): one row per dimension, in the order given (sort them
    with :func:`dims_by_kl`); use ``nrow=steps``.
    """
    x = _check_images(model, x)[:1]
    _check_int("steps", steps, 2)
    if not span > 0:
        raise InputError(f"span must be > 0, got {describe(span)}")
    z0 = model.encode(x).mean[0]  # (D,)
    D = z0.shape[0]
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < D for d in dims):
        raise InputError(f"dims must be a non-empty list of latent indices in [0, {D}), got {describe(dims)}")
    values = torch.linspace(-span, span, steps, device=z0.device)
    z = z0.repeat(len(dims), steps, 1)  # (R, S, D)
    for r, d in enumerate(dims):
        z[r, :, d] = values
    return model.decode(z.reshape(-1, D)).mean.clamp(0, 1).cpu()
