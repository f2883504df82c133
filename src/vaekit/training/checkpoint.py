"""Training checkpoints: one file per saved step, written atomically, loaded without pickled code.

A checkpoint holds everything needed to continue bit-exactly: model and optimizer
state, every RNG state (per rank under data parallelism), the step counter and the
position in the data order (epoch, next batch), plus state of callbacks.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from vaekit.errors import CheckpointError

FORMAT = "vaekit-checkpoint"
VERSION = 1
_NAME = re.compile(r"^step-(\d{9})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in ``directory``, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(directory: str | os.PathLike, step: int, payload: dict[str, Any], keep: int,
                    protect: tuple[int, ...] = ()) -> Path:
    """Write ``payload`` as ``step-<step>.pt`` (temp file + fsync + rename) and prune old ones.

    ``keep`` most recent checkpoints survive, plus any step listed in ``protect``.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / checkpoint_name(step)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    for old_step, old_path in list_checkpoints(d)[:-keep]:
        if old_step not in protect:
            old_path.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint (tensors and plain data only: ``weights_only=True``)."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vaekit checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')}, this vaekit reads {VERSION}")
    return payload


def latest_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint in ``directory`` (a corrupt newest one is skipped), or None."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path), path
        except CheckpointError:
            continue
    return None
