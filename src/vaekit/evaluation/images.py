"""Image grids written as PNG (no torchvision needed)."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vaekit.atomic import atomic_write_bytes
from vaekit.errors import InputError


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """Tile images (N, C, H, W) with values in [0, 1] into one uint8 array.

    ``nrow`` images per row (default: a near-square grid). Returns (H', W') for one
    channel or (H', W', 3) for three.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"images must be a tensor (N, 1 or 3, H, W), got {got}")
    n, c, h, w = images.shape
    if n == 0:
        raise InputError("images must hold at least one image")
    nrow = nrow or math.ceil(math.sqrt(n))
    if nrow <= 0:
        raise InputError(f"nrow must be positive, got {nrow}")
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    x = images.detach().float().cpu().clamp(0, 1)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = x[i]
    arr = (grid * 255.0 + 0.5).to(torch.uint8).numpy()
    return arr[0] if c == 1 else arr.transpose(1, 2, 0)


def save_png(array: np.ndarray, path: str | os.PathLike, scale: int = 1) -> Path:
    """Write a uint8 image array as PNG (atomically), optionally upscaled by ``scale`` (nearest)."""
    img = Image.fromarray(array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, scale: int = 2) -> Path:
    """``make_grid`` then ``save_png``."""
    return save_png(make_grid(images, nrow=nrow), path, scale=scale)
