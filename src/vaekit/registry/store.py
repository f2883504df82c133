"""The registry's content-addressed artifact folder: ``<root>/sha256/<hh>/<hash>/``, written once, never changed.

An artifact is copied into a private staging folder (``<root>/.staging/``), hashed, and renamed into place in one
step, so a reader (or a crash) sees either no folder or a complete one. Two processes storing the same content
race on the rename; the loser verifies the winner's copy and drops its own. A content folder no version refers
to (a registration killed after the copy, before its row committed) is harmless: the next registration of the
same content reuses it, and :meth:`ArtifactStore.gc` removes it once it is older than a grace period.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vaekit.errors import InputError, RegistryError

STAGING = ".staging"
CONTENT = "sha256"


@dataclass(frozen=True)
class StoredArtifact:
    """Where a stored artifact lives: its content hash, its path relative to the store's root, its absolute path."""

    hash: str
    relpath: str
    path: Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    """The regular files under ``folder`` (sorted, relative); a symlink is refused (the copy must hold the bytes)."""
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            raise InputError(f"artifact folder {folder} holds a symbolic link {p}; the registry stores real files")
        if p.is_file():
            out.append(p.relative_to(folder))
    return out


def content_hash(folder: Path) -> str:
    """sha256 over every file's relative path and sha256 (sorted): equal folders give equal hashes."""
    listing = {}
    for rel in _files(folder):
        h = hashlib.sha256()
        with open(folder / rel, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        listing[rel.as_posix()] = h.hexdigest()
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


class ArtifactStore:
    """The content-addressed folder under ``root`` (created when missing)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    @staticmethod
    def relpath_for(digest: str) -> str:
        return f"{CONTENT}/{digest[:2]}/{digest}"

    def put(self, folder: str | os.PathLike) -> StoredArtifact:
        """Copy ``folder`` into the store under its content hash (or reuse an identical copy already there)."""
        src = Path(folder)
        if not src.is_dir():
            raise InputError(f"folder must be an artifact folder, got {str(src)!r} (not a folder)")
        staging_root = self.root / STAGING
        staging_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=staging_root, prefix="put-"))
        try:
            for rel in _files(src):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, tmp / rel)
                with open(tmp / rel, "rb+") as f:
                    os.fsync(f.fileno())
            return self._commit(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _commit(self, tmp: Path) -> StoredArtifact:
        digest = content_hash(tmp)
        rel = self.relpath_for(digest)
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a shared store is read by other users
            _fsync_dir(tmp)
            try:
                tmp.rename(dest)  # atomic; fails when another process put the same content first
                _fsync_dir(dest.parent)
                return StoredArtifact(digest, rel, dest)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not dest.exists():
                    raise
        self.verify(rel, digest)
        os.utime(dest)  # a fresh mtime keeps gc's grace period from taking a folder about to be referenced
        return StoredArtifact(digest, rel, dest)

    def verify(self, relpath: str, expected: str) -> None:
        """Re-hash a stored artifact; RegistryError naming it when it is missing or its hash differs."""
        path = self.root / relpath
        if not path.is_dir():
            raise RegistryError(f"artifact {path} is missing from the registry's artifact folder")
        actual = content_hash(path)
        if actual != expected:
            raise RegistryError(f"artifact {path} is corrupt: expected content sha256 {expected}, got {actual}")

    def gc(self, referenced: Iterable[str], *, min_age_s: float = 3600.0, dry_run: bool = False) -> list[Path]:
        """Remove content folders no version refers to and staging leftovers, when older than ``min_age_s``.

        The grace period covers a registration between its copy and its commit. Returns the folders removed
        (or that would be, with ``dry_run``).
        """
        keep = set(referenced)
        now = time.time()
        candidates: list[Path] = []
        staging = self.root / STAGING
        if staging.is_dir():
            candidates += [p for p in staging.iterdir()]
        content = self.root / CONTENT
        if content.is_dir():
            for shard in content.iterdir():
                candidates += [p for p in shard.iterdir() if f"{CONTENT}/{shard.name}/{p.name}" not in keep]
        removed = []
        for p in candidates:
            try:
                if now - p.stat().st_mtime < min_age_s:
                    continue
            except FileNotFoundError:
                continue
            removed.append(p)
            if not dry_run:
                shutil.rmtree(p, ignore_errors=True)
        return removed
