"""The registry's content-addressed artifact folder: ``<root>/sha256/<hh>/<digest>/``, written once, never changed.

The address is the artifact's digest (:attr:`vaekit.artifact.Artifact.digest`: the sha256 of its
``manifest.json``, which covers every byte of the folder). An artifact is copied into a private staging folder
(``<root>/.staging/``), verified against its manifest, and renamed into place in one step, so a reader (or a
crash) sees either no folder or a complete one. Two processes storing the same content race on the rename; the
loser verifies the winner's copy and drops its own. A content folder no version refers to (a registration
killed after the copy, before its row committed) is harmless: the next registration of the same content reuses
it, and :meth:`ArtifactStore.gc` removes it once it is older than a grace period. A content folder found
damaged when the same content is stored again is moved to ``<root>/.quarantine/`` and replaced by the new,
verified copy (which also heals the versions that share it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vaekit.artifact import verify_artifact
from vaekit.errors import ArtifactError, ArtifactIntegrityError

STAGING = ".staging"
QUARANTINE = ".quarantine"
CONTENT = "sha256"


@dataclass(frozen=True)
class StoredArtifact:
    """Where a stored artifact lives: its digest, its path relative to the store's root, its absolute path."""

    hash: str
    relpath: str
    path: Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_artifact(src: Path, dst: Path) -> None:
    """Copy the artifact folder ``src`` to the new folder ``dst`` byte for byte, each file fsynced (links are
    copied as links, so verification refuses them rather than following them out of the folder)."""
    shutil.copytree(src, dst, symlinks=True)
    for root, _, files in os.walk(dst):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                with open(p, "rb+") as fh:
                    os.fsync(fh.fileno())


class ArtifactStore:
    """The content-addressed folder under ``root`` (created when missing)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    @staticmethod
    def relpath_for(digest: str) -> str:
        return f"{CONTENT}/{digest[:2]}/{digest}"

    def put(self, folder: str | os.PathLike,
            build: Callable[[Path, Path], object] | None = None) -> StoredArtifact:
        """Store the artifact at ``folder`` under its digest (or reuse an identical copy already there).

        ``folder`` is verified first (ArtifactError, ArtifactIntegrityError). ``build(folder, dst)`` writes the
        artifact to store at the new folder ``dst`` (e.g. the model with a reference profile attached); the
        default copies ``folder`` as it is.
        """
        src = Path(folder)
        source_digest = verify_artifact(src).digest
        if build is None and (self.root / self.relpath_for(source_digest)).is_dir():
            with contextlib.suppress(ArtifactError):  # a damaged copy there is replaced by a fresh one below
                return self._reuse(source_digest)
        staging_root = self.root / STAGING
        staging_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=staging_root, prefix="put-"))
        try:
            staged = tmp / "artifact"
            (build or copy_artifact)(src, staged)
            digest = verify_artifact(staged).digest  # the bytes stored are the bytes checked
            if build is None and digest != source_digest:
                raise ArtifactIntegrityError(str(src), [("manifest.json", "changed while it was being copied",
                                                         source_digest, digest)])
            return self._commit(staged, digest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _reuse(self, digest: str) -> StoredArtifact:
        rel = self.relpath_for(digest)
        self.verify(rel, digest)
        os.utime(self.root / rel)  # a fresh mtime keeps gc's grace period from taking a folder about to be used
        return StoredArtifact(digest, rel, self.root / rel)

    def _commit(self, staged: Path, digest: str) -> StoredArtifact:
        rel = self.relpath_for(digest)
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            try:
                return self._reuse(digest)
            except ArtifactError:
                self._quarantine(dest)  # damaged (a disk fault, a hand edit): our verified copy takes its place
        if not dest.exists():
            os.chmod(staged, 0o755)  # a shared store is read by other users
            _fsync_dir(staged)
            try:
                staged.rename(dest)  # atomic; fails when another process stored the same content first
                _fsync_dir(dest.parent)
                return StoredArtifact(digest, rel, dest)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not dest.exists():
                    raise
        return self._reuse(digest)

    def _quarantine(self, dest: Path) -> None:
        """Move a damaged content folder aside into ``<root>/.quarantine/`` (kept for inspection, never used)."""
        aside = self.root / QUARANTINE
        aside.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            dest.rename(aside / f"{dest.name}-{time.time_ns()}-{os.getpid()}")

    def verify(self, relpath: str, expected: str) -> None:
        """Re-hash a stored artifact against its manifest and its digest against ``expected`` (the one recorded
        at registration). ArtifactIntegrityError naming the file (or the manifest) otherwise; ArtifactError
        when the folder is gone."""
        path = self.root / relpath
        digest = verify_artifact(path).digest
        if digest != expected:
            raise ArtifactIntegrityError(str(path), [("manifest.json", "differs from the one registered",
                                                      expected, digest)])

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
