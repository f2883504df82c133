"""Atomic writes: a reader (or a crash) never sees half a file or half a folder.

Files go through a temporary file in the same directory and ``os.replace``; folders (saved
models, FID extractors) are built in a temporary sibling folder and swapped in with two renames,
the old folder kept until the new one is in place. An OS failure (no space left, read-only,
permission denied) is raised as :class:`~vaekit.errors.StorageError`, its message opening with
the OS reason and naming the path; nothing half-written is left behind. Temporary names start
with ``.<name>.`` so a crashed write can be recognised and cleaned (``TEMP_PATTERNS``).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vaekit.errors import StorageError

# names this module's temporaries get (fnmatch patterns): files ``.<name>.<random>.tmp``, folders
# ``.<name>.<random>`` and ``.<name>.old``; left only by a process killed mid-write
TEMP_FILE_PATTERN = ".*.tmp"


def _free_space(path: Path) -> str:
    try:
        st = os.statvfs(path)
    except OSError:
        return "unknown"
    return f"{st.f_bavail * st.f_frsize / 2**20:.1f} MiB"


def storage_error(exc: OSError, path: str | os.PathLike, what: str = "write") -> StorageError:
    """A :class:`StorageError` for ``exc`` raised while trying to ``what`` ``path``: one line,
    the OS reason first ("no space left on device: cannot write checkpoint ...")."""
    if isinstance(exc, StorageError):
        return exc
    path = Path(path)
    reason = exc.strerror or str(exc)
    reason = reason[0].lower() + reason[1:] if reason else type(exc).__name__
    msg = f"{reason}: cannot {what} {path}"
    if exc.errno == errno.ENOSPC:
        existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
        msg += f" ({_free_space(existing)} free there); free some space and run the same command again"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        msg += " (the folder is not writable by this user, or its file system is read-only)"
    return StorageError(msg, exc.errno, str(path))


def atomic_write_bytes(path: str | os.PathLike, data: bytes, what: str = "write") -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers never see half a file.

    ``what`` names the file in an error ("write checkpoint"). Raises StorageError on an OS failure."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise storage_error(exc, path, what) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cached data should be readable like any file
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise storage_error(exc, path, what) from exc
        raise


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; when the block ends without an error it
    replaces ``path`` (an existing folder there is moved aside first and removed last). On an
    error the temporary folder is removed and ``path`` is untouched; an OS error (in the block
    or in the swap) is raised as StorageError naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    except OSError as exc:
        raise storage_error(exc, path) from exc
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise storage_error(exc, path) from exc
        raise
