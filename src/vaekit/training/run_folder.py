"""The run folder's own jobs: one writer at a time, crash leftovers, run history, config revisions.

``RUN/`` holds what :class:`~vaekit.training.trainer.Trainer` writes (``checkpoints/``,
``metrics.jsonl``, ``model/``, ``config.json`` + ``config.yaml``) plus:

- ``.lock`` (an OS file lock, ``fcntl.flock``, held for the whole run) and ``lock.json`` beside
  it (pid, host, start time and command of the holder; removed when the run ends). A second
  process that tries to train into the folder fails at once with :class:`RunLockedError`
  naming the holder. The kernel drops the lock when its process dies, so a ``lock.json`` found
  by a process that got the lock is a stale one (its writer was killed): it is taken over with
  a message.
- ``previous/1/``, ``previous/2/``, ...: earlier runs set aside by a fresh start
  (``--no-resume``): what they wrote (checkpoints, log, model, configs, reports), moved, never
  deleted.
- ``config.revisions.json``: every config the run was trained with and the step each took
  over (``{"revisions": [{"revision": 1, "from_step": 0, "config": {...}}, {"revision": 2,
  "from_step": 420, "changed": {"train.batch_size": [128, 64]}, "config": {...}}]}``);
  ``config.json`` is always the newest revision.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import fnmatch
import json
import os
import shutil
import socket
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from vaekit.atomic import TEMP_FILE_PATTERN, atomic_write_bytes, restore_interrupted, storage_error
from vaekit.errors import CheckpointError, RunLockedError

LOCK = ".lock"
HOLDER = "lock.json"
PREVIOUS = "previous"
REVISIONS = "config.revisions.json"
# settings a resumed run must share with the run it continues: they define the weights' shape and
# which examples were trained on (changing them mid-run would mix two different experiments)
SPLIT_KEYS = ("dataset", "train_subset", "validation", "validation_seed")
# what training and the CLI write into a run folder: a fresh start moves these into previous/N
RUN_FILES = ("checkpoints", "metrics.jsonl", "model", "config.json", "config.yaml", REVISIONS, "tensorboard",
             "eval.json", "report", "samples.png", "reconstructions.png", "checkpoints.previous")
# not part of how a run is trained: where the folder is
_PLACE_KEYS = ("name", "out_dir")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def read_holder(run_dir: str | os.PathLike) -> dict[str, Any]:
    """What ``lock.json`` says about the process holding (or last holding) the folder's lock ({} if none)."""
    try:
        doc = json.loads((Path(run_dir) / HOLDER).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``RUN/.lock`` with the holder written to ``RUN/lock.json``."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None
        self.took_over: dict[str, Any] | None = None  # the stale holder found, if any

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock or raise RunLockedError (another live process holds it) / StorageError
        (the folder cannot be created or written)."""
        if self._fd is not None:
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise storage_error(exc, self.run_dir, "create the run folder") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockedError(str(self.run_dir), read_holder(self.run_dir)) from None
            raise storage_error(exc, self.run_dir / LOCK, "lock") from exc
        self._fd = fd
        stale = read_holder(self.run_dir)
        if stale:
            self.took_over = stale
            here = stale.get("host") == socket.gethostname()
            pid = stale.get("pid")
            state = ("is no longer running" if here and isinstance(pid, int) and not _pid_alive(pid)
                     else "no longer holds the lock")
            warnings.warn(f"{self.run_dir}: taking over the stale lock of pid {pid} on {stale.get('host')} "
                          f"(started {stale.get('started')}), which {state}; it stopped without finishing",
                          stacklevel=3)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)[:500]}
        try:
            atomic_write_bytes(self.run_dir / HOLDER, (json.dumps(holder, indent=2) + "\n").encode())
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        """Remove ``lock.json`` and drop the lock (the ``.lock`` file stays: removing it would let
        two processes lock two different files of the same name)."""
        if self._fd is None:
            return
        try:
            (self.run_dir / HOLDER).unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_writable(run_dir: str | os.PathLike) -> None:
    """Without leaving anything behind: StorageError unless ``run_dir`` (or the nearest folder above
    it that exists) is a folder a file can be created in; RunLockedError when another process
    trains into it."""
    run_dir = Path(run_dir)
    existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise storage_error(OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)), existing,
                            f"create the run folder {run_dir} under")
    try:  # a real try, removed at once: os.access cannot see a read-only mount or a full inode table
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".vaekit-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise storage_error(exc, run_dir, "create the run folder" if existing != run_dir else "write into") from exc
    if (run_dir / LOCK).is_file():
        try:
            fd = os.open(run_dir / LOCK, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunLockedError(str(run_dir), read_holder(run_dir)) from None
        finally:
            os.close(fd)  # closing drops a lock we took


class RunFolder:
    """The run folder's jobs other than the training itself. Write methods need the lock held."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir)
        self.lock = RunLock(self.path)

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def _check_locked(self) -> None:
        assert self.lock.held, "the run folder's lock must be held to change it"

    # -- crash leftovers ----------------------------------------------------------------------
    def clean_temporaries(self) -> list[Path]:
        """Remove what a process killed mid-write left (``.step-*.pt.*.tmp``, ``.metrics.jsonl.*.tmp``,
        ``.model.*`` folders) in the run folder and ``checkpoints/``; return what was removed."""
        self._check_locked()
        if restore_interrupted(self.path / "model"):  # a crash mid-swap: the old model is the only copy
            warnings.warn(f"{self.path}: put back model/ from .model.old (a save was interrupted)", stacklevel=5)
        removed = []
        for d in (self.path, self.checkpoint_dir):
            if not d.is_dir():
                continue
            for p in d.iterdir():
                if p.name in (LOCK, HOLDER):
                    continue
                if p.is_file() and fnmatch.fnmatch(p.name, TEMP_FILE_PATTERN):
                    p.unlink(missing_ok=True)
                    removed.append(p)
                elif p.is_dir() and d == self.path and p.name.startswith(".model."):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        if removed:
            warnings.warn(f"{self.path}: removed {len(removed)} temporary file(s) left by an interrupted run: "
                          + ", ".join(str(p.relative_to(self.path)) for p in removed), stacklevel=5)
        return removed

    # -- run history ----------------------------------------------------------------------------
    def has_results(self) -> bool:
        """Does the folder hold anything of an earlier run (checkpoints, a metrics log, a model)?"""
        ck = self.checkpoint_dir
        return ((ck.is_dir() and any(ck.iterdir())) or (self.path / "metrics.jsonl").is_file()
                or (self.path / "model").exists())

    def set_aside(self) -> Path | None:
        """Move what an earlier run left (``RUN_FILES``: checkpoints, log, model, configs, reports)
        into ``previous/<N>/``, N one more than the highest there; return it (None if nothing to
        move). Anything else in the folder stays where it is."""
        self._check_locked()
        if not self.has_results():
            return None
        parent = self.path / PREVIOUS
        numbers = [int(p.name) for p in parent.iterdir() if p.name.isdigit()] if parent.is_dir() else []
        target = parent / str(max(numbers, default=0) + 1)
        try:
            target.mkdir(parents=True)
            for name in RUN_FILES:
                if (self.path / name).exists():
                    (self.path / name).rename(target / name)
        except OSError as exc:
            raise storage_error(exc, target, "set the earlier run aside into") from exc
        return target

    # -- config revisions -------------------------------------------------------------------------
    def saved_config(self) -> dict[str, Any] | None:
        """The newest recorded run config (``config.json``), or None."""
        path = self.path / "config.json"
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is damaged ({exc}); it records how this run was trained") from exc
        return doc if isinstance(doc, dict) else None

    def check_compatible(self, new: dict[str, Any]) -> None:
        """CheckpointError when ``new`` changes the model config or the data split of the saved run."""
        old = self.saved_config()
        if old is None:
            return
        if old.get("model") != new.get("model"):
            raise CheckpointError(
                f"{self.path} holds a run with a different model config; choose another name "
                f"(--set name=...) or start afresh (--no-resume, which keeps that run in previous/)")
        old_data, new_data = old.get("data") or {}, new.get("data") or {}
        changed = [k for k in SPLIT_KEYS if k in old_data and old_data.get(k) != new_data.get(k)]
        if changed:
            raise CheckpointError(
                f"{self.path} holds a run trained on a different split (data.{', data.'.join(changed)} "
                f"changed); choose another name (--set name=...) or start afresh (--no-resume)")

    def revisions(self) -> list[dict[str, Any]]:
        """Every recorded config revision, oldest first (a run from before revisions were kept: its
        ``config.json`` as revision 1)."""
        path = self.path / REVISIONS
        if path.is_file():
            try:
                return list(json.loads(path.read_text())["revisions"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{path} is damaged ({exc}); it records how this run was trained") from exc
        old = self.saved_config()
        return [{"revision": 1, "from_step": 0, "config": old}] if old is not None else []

    def record_config(self, new: dict[str, Any], step: int) -> dict[str, Any] | None:
        """Save ``new`` as the run config from ``step`` on: ``config.json``/``config.yaml`` and, if it
        differs from the newest revision (allowed changes only: call :meth:`check_compatible`
        first), a new entry in ``config.revisions.json``. Returns the new revision or None."""
        self._check_locked()
        import yaml

        revs = self.revisions()
        entry = None
        if not revs or step == 0:
            revs = [{"revision": 1, "from_step": 0, "config": new}]  # a fresh start: a new record
        else:
            changed = _diff(revs[-1]["config"], new)
            if changed:
                entry = {"revision": revs[-1]["revision"] + 1, "from_step": step, "changed": changed, "config": new}
                revs.append(entry)
            else:
                revs[-1]["config"] = new  # only where the folder is (name, out_dir) may differ
        atomic_write_bytes(self.path / REVISIONS, (json.dumps({"revisions": revs}, indent=2) + "\n").encode())
        atomic_write_bytes(self.path / "config.json", (json.dumps(new, indent=2) + "\n").encode())
        atomic_write_bytes(self.path / "config.yaml", yaml.safe_dump(new, sort_keys=False).encode())
        return entry


def _flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(doc, dict):
        out: dict[str, Any] = {}
        for k, v in doc.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: doc}


def _diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """{dotted key: [old value, new value]} of the settings that differ (the folder's place aside)."""
    a, b = _flatten(old), _flatten(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in _PLACE_KEYS}
