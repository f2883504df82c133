"""dSprites (Matthey et al. 2017), regenerated procedurally: the original file cannot be fetched here.

The published description, which this generator follows exactly:

* 64 x 64 binary images of one white sprite on black, 737,280 images: every combination of
  color (1: white), shape (3: square, ellipse, heart), scale (6 values linearly spaced in
  [0.5, 1]), orientation (40 values in [0, 2 pi]), position x (32 values in [0, 1]) and
  position y (32 values in [0, 1]);
* stored in factor order (color, shape, scale, orientation, x, y) with position y varying
  fastest, so image ``i`` has the factor classes ``numpy.unravel_index(i, (1, 3, 6, 40, 32, 32))``;
* factor values as in the original ``latents_values``: shape 1, 2, 3; scale
  ``linspace(0.5, 1, 6)``; orientation ``linspace(0, 2 pi, 40)`` (both ends included, so the
  first and the last orientation draw the same picture, as in the original file); x and y
  ``linspace(0, 1, 32)``.

How the sprites are drawn (our choices; the original rendering code is not published):

* A pixel ``(row, col)`` is on when its centre ``(row + 0.5, col + 0.5)`` lies inside the sprite:
  no anti-aliasing, so images are exactly binary, as in the original.
* The sprite's centre is at pixel coordinates ``(16 + 32 * y * 31/32, 16 + 32 * x * 31/32)``, i.e. 16 to
  47 in steps of exactly one pixel. Integer steps make every position an exact shift of one
  rendered template, and every position step visibly changes the image (the description says
  steps were chosen "to have the smallest step changes while ensuring that all pixel outputs
  were different"). ``y = 0`` is the top row.
* Shapes are defined in sprite units ``(u, v)`` (``v`` points down the image) and scaled by
  ``scale * 10`` pixels: square ``max(|u|, |v|) <= 1`` (20 px wide at scale 1), ellipse
  ``u^2 + (v / 0.5)^2 <= 1`` (2:1 axes, 20 x 10 px at scale 1), heart
  ``(a^2 + b^2 - 1)^3 - a^2 b^3 <= 0`` with ``(a, b) = (1.14 u, 1.1 (0.05 - v))`` (the classic
  sextic heart, lobes up, about 20 px wide at scale 1). The largest sprite reaches 14.2 px from
  its centre (the rotated square), so every sprite stays inside the frame.
* Orientation ``theta`` rotates the sprite counter-clockwise as seen on screen.

Compared with the published images, sizes, margins and the exact heart outline differ by a few
pixels, and pixels on a shape's edge may differ; the factor grid, the order, the image count,
binarity and the factor semantics are the same. Numbers measured on this generator (MIG, ELBO)
are therefore close to, not identical with, numbers on the original file.

The full array is 3 GB of uint8, so it is generated once into the cache as a raw ``.npy`` file
(checked against a recorded MD5 when written) and memory-mapped on load: splits are views and
only the images a run uses are read into memory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vaekit.atomic import atomic_write_bytes
from vaekit.data.dataset import ImageDataset, ImageSplit
from vaekit.data.idx import md5_file
from vaekit.data.sources import default_cache_dir
from vaekit.errors import DataError, InputError, describe

FACTOR_NAMES = ("color", "shape", "scale", "orientation", "posX", "posY")
FACTOR_SIZES = (1, 3, 6, 40, 32, 32)
NUM_IMAGES = math.prod(FACTOR_SIZES)  # 737,280
SHAPES = ("square", "ellipse", "heart")
IMAGE_SIZE = 64
UNIT_PX = 10.0  # pixels per sprite unit at scale 1
FIRST_CENTRE = 16.0  # centre of the sprite at position 0, pixels from the top/left edge
TEST_SIZE = 10_000
SPLIT_SEED = 0
CACHE_KEY = "dsprites-vaekit-v1"
# MD5 of the generated (737280, 64, 64) uint8 array in factor order; fixed by the drawing rules above.
IMAGES_MD5 = "c95471cdb41a899e41eef80f45fd19c8"


def factor_values() -> dict[str, np.ndarray]:
    """The value of each class of each factor, as in the original ``latents_values``."""
    return {
        "color": np.array([1.0]),
        "shape": np.array([1.0, 2.0, 3.0]),
        "scale": np.linspace(0.5, 1.0, 6),
        "orientation": np.linspace(0.0, 2 * np.pi, 40),
        "posX": np.linspace(0.0, 1.0, 32),
        "posY": np.linspace(0.0, 1.0, 32),
    }


def _check_index(index: np.ndarray | Sequence[int] | torch.Tensor) -> np.ndarray:
    idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise InputError(f"index must be a 1-D array of integers, got {describe(index)}")
    if idx.size and (idx.min() < 0 or idx.max() >= NUM_IMAGES):
        raise InputError(f"dSprites indices must be in [0, {NUM_IMAGES}), got values in [{idx.min()}, {idx.max()}]")
    return idx.astype(np.int64)


def factor_classes(index: np.ndarray | Sequence[int] | torch.Tensor) -> np.ndarray:
    """Factor classes (N, 6) int64 of images ``index`` (N,), in the order of :data:`FACTOR_NAMES`."""
    return np.stack(np.unravel_index(_check_index(index), FACTOR_SIZES), axis=1).astype(np.int64)


def latents_values(index: np.ndarray | Sequence[int] | torch.Tensor) -> np.ndarray:
    """Factor values (N, 6) float64 of images ``index`` (N,), as in the original ``latents_values``."""
    classes = factor_classes(index)
    vals = factor_values()
    return np.stack([vals[name][classes[:, j]] for j, name in enumerate(FACTOR_NAMES)], axis=1)


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of points (u, v) in sprite units inside shape class ``shape``."""
    if shape == 0:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 1.0
    if shape == 1:  # ellipse, 2:1
        return u**2 + (v / 0.5) ** 2 <= 1.0
    a, b = 1.14 * u, 1.1 * (0.05 - v)  # heart, lobes up (v points down the image)
    return (a**2 + b**2 - 1.0) ** 3 - a**2 * b**3 <= 0.0


def render_template(shape: int, scale: float, theta: float) -> np.ndarray:
    """(64, 64) bool: the sprite centred on the pixel corner (32, 32)."""
    centres = np.arange(IMAGE_SIZE) + 0.5 - IMAGE_SIZE / 2  # pixel centres relative to the sprite centre
    dy, dx = np.meshgrid(centres, centres, indexing="ij")
    # rotate the sampling points by -theta: the sprite appears rotated by +theta (counter-clockwise
    # on screen, where y points down)
    c, s = math.cos(theta), math.sin(theta)
    u = (c * dx - s * dy) / (scale * UNIT_PX)
    v = (s * dx + c * dy) / (scale * UNIT_PX)
    return _inside(shape, u, v)


@functools.lru_cache(maxsize=1)
def templates() -> np.ndarray:
    """(3, 6, 40, 64, 64) uint8, read-only: every (shape, scale, orientation) sprite at the canvas centre."""
    vals = factor_values()
    out = np.zeros((3, 6, 40, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for sh in range(3):
        for sc, scale in enumerate(vals["scale"]):
            for o, theta in enumerate(vals["orientation"]):
                out[sh, sc, o] = render_template(sh, float(scale), float(theta))
    out.setflags(write=False)  # cached and shared
    return out


def render(index: np.ndarray | Sequence[int] | torch.Tensor, tmpl: np.ndarray | None = None) -> np.ndarray:
    """Images (N, 64, 64) uint8 in {0, 1} of dataset indices (N,), generated directly."""
    classes = factor_classes(index)
    tmpl = templates() if tmpl is None else tmpl
    out = np.zeros((len(classes), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    shift0 = int(FIRST_CENTRE - IMAGE_SIZE / 2)  # -16: template centre 32 -> centre 16 at position 0
    for i, (_, sh, sc, o, px, py) in enumerate(classes):
        out[i] = np.roll(tmpl[sh, sc, o], (shift0 + py, shift0 + px), axis=(0, 1))
    return out


def generate_all(tmpl: np.ndarray | None = None) -> np.ndarray:
    """All 737,280 images (N, 64, 64) uint8 in {0, 1}, in the original factor order (y fastest)."""
    tmpl = templates() if tmpl is None else tmpl
    out = np.empty((NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    shift0 = int(FIRST_CENTRE - IMAGE_SIZE / 2)
    # source row/column of each output pixel for each of the 32 positions (a cyclic shift; it never
    # wraps sprite pixels because every sprite stays >= 1 px inside the frame)
    src = (np.arange(IMAGE_SIZE)[None, :] - shift0 - np.arange(32)[:, None]) % IMAGE_SIZE  # (32, 64)
    rows, cols = src[None, :, :, None], src[:, None, None, :]  # (1, py, 64, 1), (px, 1, 1, 64)
    block = 32 * 32
    for k, (sh, sc, o) in enumerate(np.ndindex(3, 6, 40)):
        out[k * block : (k + 1) * block] = tmpl[sh, sc, o][rows, cols].reshape(block, IMAGE_SIZE, IMAGE_SIZE)
    return out


def split_order(seed: int = SPLIT_SEED) -> np.ndarray:
    """The fixed permutation of dataset indices: the first 10,000 are the test split, the rest train."""
    return np.random.default_rng(seed).permutation(NUM_IMAGES)


def cache_files(cache_dir: Path) -> tuple[Path, Path]:
    folder = cache_dir / CACHE_KEY
    return folder / "images-split-order.npy", folder / "meta.json"


def images_md5(images: np.ndarray) -> str:
    """MD5 of an image array's raw bytes (C order)."""
    return hashlib.md5(memoryview(np.ascontiguousarray(images)).cast("B")).hexdigest()


def build_cache(cache_dir: Path) -> Path:
    """Generate every image, check the MD5 of the factor-ordered array, write it in split order (0/255)."""
    images_file, meta_file = cache_files(cache_dir)
    images_file.parent.mkdir(parents=True, exist_ok=True)
    data = generate_all()
    got = images_md5(data)
    if got != IMAGES_MD5:
        raise DataError(f"the dSprites generator produced data with md5 {got}, expected {IMAGES_MD5}; "
                        "the drawing code or numpy changed its output")
    order = split_order()
    tmp = images_file.with_name(f".{images_file.name}.{os.getpid()}.tmp.npy")
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(NUM_IMAGES, 1, IMAGE_SIZE, IMAGE_SIZE))
        for lo in range(0, NUM_IMAGES, 65536):
            mm[lo : lo + 65536, 0] = data[order[lo : lo + 65536]] * np.uint8(255)
        mm.flush()
        del mm
        os.replace(tmp, images_file)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"generator": CACHE_KEY, "images_md5_factor_order": IMAGES_MD5, "split_seed": SPLIT_SEED,
            "test_size": TEST_SIZE, "file_md5": md5_file(images_file)}
    atomic_write_bytes(meta_file, (json.dumps(meta, indent=2) + "\n").encode())
    return images_file


def _open_cache(cache_dir: Path, verify: bool) -> np.ndarray:
    images_file, meta_file = cache_files(cache_dir)
    if images_file.is_file() and meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        ok = meta.get("images_md5_factor_order") == IMAGES_MD5 and meta.get("split_seed") == SPLIT_SEED
        if ok and verify:
            ok = md5_file(images_file) == meta.get("file_md5")
        if ok:
            arr = np.load(images_file, mmap_mode="c", allow_pickle=False)
            if arr.shape == (NUM_IMAGES, 1, IMAGE_SIZE, IMAGE_SIZE) and arr.dtype == np.uint8:
                return arr
        images_file.unlink(missing_ok=True)  # stale or damaged: regenerate
    build_cache(cache_dir)
    return np.load(images_file, mmap_mode="c", allow_pickle=False)


def load_dsprites(
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    sources: Sequence[str] | str | None = None,
    verify: bool = False,
) -> ImageDataset:
    """dSprites as an ImageDataset of (1, 64, 64) uint8 images with values 0 and 255.

    Test split: a fixed random 10,000 images; train: the other 727,280, in a fixed random order
    (so ``data.train_subset=N`` is a uniform random subsample). Labels are the shape class (0-2);
    ``info["train_index"]``/``info["test_index"]`` hold each image's index in the original factor
    order, from which :func:`factor_classes` gives all six factors. The first call generates the
    cache (about a minute, 3 GB on disk); later calls memory-map it. ``verify`` re-hashes the
    cached file. ``data_dir`` and ``sources`` are accepted for a uniform signature and unused:
    the data is generated, never downloaded.
    """
    del data_dir, sources
    cdir = Path(cache_dir) if cache_dir else default_cache_dir()
    arr = _open_cache(cdir, verify)
    order = split_order()
    images = torch.from_numpy(arr)  # (N, 1, 64, 64) uint8 0/255, memory-mapped copy-on-write
    labels = torch.from_numpy(factor_classes(order)[:, 1].copy())
    test = ImageSplit(images[:TEST_SIZE], labels[:TEST_SIZE])
    train = ImageSplit(images[TEST_SIZE:], labels[TEST_SIZE:])
    info = {"train_index": order[TEST_SIZE:], "test_index": order[:TEST_SIZE], "factor_names": FACTOR_NAMES,
            "factor_sizes": FACTOR_SIZES, "variant": "vaekit procedural generator v1 (see vaekit.data.dsprites)"}
    return ImageDataset("dsprites", train, test, SHAPES, provenance=f"generated: {cdir / CACHE_KEY}", info=info)
