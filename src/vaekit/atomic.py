"""Atomic writes: a reader (or a crash) never sees half a file or half a folder.

Files go through a temporary file in the same directory and ``os.replace``; folders (saved
models, FID extractors) are built in a temporary sibling folder and swapped in: on Linux with one
``renameat2(RENAME_EXCHANGE)``, so the path always holds the old or the new folder, never neither;
elsewhere with two renames, the old folder kept as ``.<name>.old`` until the new one is in place
(a crash between them leaves it there, and the next write of that path puts it back first).
An OS failure (no space left, read-only, permission denied) is raised as
:class:`~vaekit.errors.StorageError`, its message opening with the OS reason and naming the
path; nothing half-written is left behind. Temporary names start with ``.<name>.`` so a crashed
write can be recognised and cleaned (``TEMP_FILE_PATTERN``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes | Sequence[bytes | memoryview],
                       what: str = "write") -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers never see half a file.

    ``data`` is the content, or its parts in order (written one after the other, so a large
    payload need not be copied into one buffer first). ``what`` names the file in an error
    ("write checkpoint"). Raises StorageError on an OS failure."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise storage_error(exc, path, what) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            for part in (data,) if isinstance(data, bytes | bytearray | memoryview) else data:
                f.write(part)
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


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where the C
    library or the file system cannot, so the caller falls back to two renames."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def restore_interrupted(path: str | os.PathLike) -> bool:
    """Put back ``.<name>.old`` when a crash between the two renames of a folder swap left ``path``
    missing; True when it did."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if old.is_dir() and not path.exists():
        old.rename(path)
        return True
    return False


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
        restore_interrupted(path)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    except OSError as exc:
        raise storage_error(exc, path) from exc
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        if path.is_dir() and not path.is_symlink() and _exchange(tmp, path):
            shutil.rmtree(tmp)  # it now holds the old folder
            return
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
