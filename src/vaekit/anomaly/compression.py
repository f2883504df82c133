"""Lossless compressed length of images, the complexity estimate of Serrà et al. (2020).

Each image is turned into its 8-bit form (round(255 x)), written as a PNG by Pillow at
``compress_level`` (9: smallest, as in the Likelihood Regret authors' input-complexity code),
and its length is counted in nats: ``8 * len(png_bytes) * ln 2``. The length includes the PNG
container (signature, IHDR, IEND: a constant 57 bytes for a grey image plus the IDAT chunk
header), the same for every image of one shape, so it shifts scores without reordering them.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch
from PIL import Image

from vaekit.errors import InputError, describe

NATS_PER_BYTE = 8.0 * math.log(2.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images (B, C, H, W) in [0, 1] -> uint8 array (B, C, H, W), round(255 x)."""
    return torch.round(x.detach().float().clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()


def png_bytes(image: np.ndarray, compress_level: int = 9) -> bytes:
    """One uint8 image (C, H, W), C = 1 (grey) or 3 (RGB), as PNG bytes written by Pillow."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InputError(f"image must be a uint8 array (C, H, W) with C = 1 or 3, got {got}")
    pil = Image.fromarray(image[0], mode="L") if image.shape[0] == 1 else Image.fromarray(image.transpose(1, 2, 0),
                                                                                           mode="RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def check_compress_level(compress_level: Any) -> int:
    if isinstance(compress_level, bool) or not isinstance(compress_level, int) or not 0 <= compress_level <= 9:
        raise InputError(f"compress_level must be an integer in [0, 9], got {describe(compress_level)}")
    return compress_level


def compressed_length(x: torch.Tensor, compress_level: int = 9) -> torch.Tensor:
    """PNG length of each image of x (B, C, H, W) in [0, 1], C = 1 or 3: (B,) float64 nats."""
    check_compress_level(compress_level)
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"x must be a non-empty batch (B, C, H, W) with C = 1 or 3, got {got}")
    arr = to_uint8(x)
    lengths = [len(png_bytes(img, compress_level)) for img in arr]
    return torch.tensor(lengths, dtype=torch.float64) * NATS_PER_BYTE
