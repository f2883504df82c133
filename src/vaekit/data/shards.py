"""Image shards: a minimal on-disk format for captured or exported images, and splits by name.

A shard is one ``.npz`` file (numpy's zip of arrays, read with ``allow_pickle=False``: no code
runs on load) holding

- ``images``: uint8, (N, C, H, W) or (N, H, W) (one channel), grey levels 0..255;
- ``labels``: int64 (N,) (optional: -1 for every image when absent, i.e. unlabelled).

A shard folder is every ``*.npz`` directly inside it, read in name order and concatenated
(``shard-000000.npz``, ``shard-000001.npz``, ... as :func:`write_shard` names them), so
appending a shard never reorders what was there. Shards are written atomically.

:func:`load_split` reads a split from a spec: a dataset name (``mnist``: its train split;
``mnist:test``: its test split), a shard file, or a shard folder.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vaekit.atomic import atomic_write_bytes
from vaekit.data.dataset import ImageSplit
from vaekit.errors import ConfigError, DataError, InputError

SUFFIX = ".npz"


def write_shard(path: str | os.PathLike, images: torch.Tensor | np.ndarray,
                labels: torch.Tensor | np.ndarray | None = None, *, extra: dict[str, np.ndarray] | None = None
                ) -> Path:
    """Write ``images`` (N, C, H, W) or (N, H, W) uint8 and ``labels`` (N,) integers (None:
    unlabelled, stored as -1) to the shard file ``path`` atomically; returns the path.

    ``extra``: further per-image arrays (N, ...) of numbers or strings stored beside them (the
    request capture's ``times`` and ``request_ids``); readers of images and labels ignore them."""
    img = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if img.dtype != np.uint8 or img.ndim not in (3, 4) or img.shape[0] == 0:
        raise InputError(f"images must be a non-empty uint8 array (N, C, H, W) or (N, H, W), "
                         f"got {img.dtype} {tuple(img.shape)}")
    n = img.shape[0]
    lab = np.full(n, -1, np.int64) if labels is None else (
        labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels))
    if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer):
        raise InputError(f"labels must be integers of shape ({n},), got {lab.dtype} {tuple(lab.shape)}")
    arrays = {}
    for key, arr in (extra or {}).items():
        arr = np.asarray(arr)
        if key in ("images", "labels") or arr.ndim < 1 or arr.shape[0] != n or arr.dtype.kind not in "biufU":
            raise InputError(f"extra[{key!r}] must be a per-image array of numbers or strings ({n}, ...) named "
                             f"neither images nor labels, got {arr.dtype} {tuple(arr.shape)}")
        arrays[key] = arr
    buf = io.BytesIO()
    np.savez(buf, images=img, labels=lab.astype(np.int64), **arrays)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue(), "write the shard")
    return path


def next_shard_path(folder: str | os.PathLike) -> Path:
    """``folder/shard-NNNNNN.npz``, one past the highest number there."""
    folder = Path(folder)
    numbers = [int(p.stem.split("-")[1]) for p in folder.glob(f"shard-*{SUFFIX}") if p.stem.split("-")[1].isdigit()]
    return folder / f"shard-{max(numbers, default=-1) + 1:06d}{SUFFIX}"


def read_shard(path: str | os.PathLike) -> ImageSplit:
    """One shard file as an :class:`ImageSplit`; DataError naming the file when it is not one."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as doc:
            if "images" not in doc.files:
                raise DataError(f"shard {path} holds no 'images' array (it holds {sorted(doc.files)})")
            img = doc["images"]
            lab = doc["labels"] if "labels" in doc.files else np.full(img.shape[0], -1, np.int64)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"shard {path} cannot be read as an .npz of images and labels: {exc}") from exc
    if img.ndim == 3:
        img = img[:, None]
    if img.dtype != np.uint8 or img.ndim != 4:
        raise DataError(f"shard {path}: images must be uint8 (N, C, H, W), got {img.dtype} {tuple(img.shape)}")
    if lab.shape != (img.shape[0],) or not np.issubdtype(lab.dtype, np.integer):
        raise DataError(f"shard {path}: labels must be integers ({img.shape[0]},), got {lab.dtype} {tuple(lab.shape)}")
    return ImageSplit(torch.from_numpy(np.ascontiguousarray(img)), torch.from_numpy(lab.astype(np.int64)))


def load_shards(path: str | os.PathLike) -> ImageSplit:
    """A shard file, or every shard in a folder (name order) concatenated; DataError when the
    folder holds none or their image shapes differ."""
    path = Path(path)
    files: Sequence[Path] = [path] if path.is_file() else sorted(path.glob(f"*{SUFFIX}"))
    if not files:
        raise DataError(f"{path} holds no shard files (*{SUFFIX})")
    splits = [read_shard(f) for f in files]
    shapes = {tuple(s.images.shape[1:]) for s in splits}
    if len(shapes) > 1:
        raise DataError(f"the shards in {path} hold images of different shapes: {sorted(shapes)}")
    return ImageSplit(torch.cat([s.images for s in splits]), torch.cat([s.labels for s in splits]))


def load_split(spec: str, *, data_dir: str | os.PathLike | None = None, sources: str | None = None) -> ImageSplit:
    """The split ``spec`` names: ``NAME`` or ``NAME:train`` / ``NAME:test`` (a dataset of
    :data:`vaekit.data.LOADERS`), or a path to a shard file or folder."""
    from vaekit.data import LOADERS, load_dataset

    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"a split must be a dataset name (NAME or NAME:train|test) or a shard folder, got {spec!r}")
    name, _, which = spec.partition(":")
    if name in LOADERS:
        if which not in ("", "train", "test"):
            raise ConfigError(f"split {spec!r}: the part after ':' must be train or test, got {which!r}")
        data = load_dataset(name, data_dir=data_dir, sources=sources)
        return data.test if which == "test" else data.train
    if Path(spec).exists():
        return load_shards(spec)
    raise ConfigError(f"split {spec!r} is neither a dataset ({', '.join(sorted(LOADERS))}, optionally with :train "
                      f"or :test) nor an existing shard file or folder")
