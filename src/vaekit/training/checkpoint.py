"""Training checkpoints: one file per saved step, checksummed, written atomically, loaded without pickled code.

A checkpoint holds everything needed to continue bit-exactly: model and optimizer
state, every RNG state (per rank under data parallelism), the step counter and the
position in the data order (epoch, next batch), plus state of callbacks.

File layout (version 2): one JSON header line, then the payload as ``torch.save`` bytes::

    {"format": "vaekit-checkpoint", "version": 2, "sha256": "<hex of the payload>", "size": N,
     "step": S, "epoch": E, "batch": B, "branch": R}\\n<N payload bytes>

The header's step/epoch/batch/branch let the checkpoint index be rebuilt without reading the
payload. A file whose payload is short (truncated) or whose SHA-256 differs (a flipped byte) is
refused before ``torch.load`` sees it. Version-1 files (a bare ``torch.save``, no checksum) are
still read, with only torch's own checks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from vaekit.atomic import atomic_write_bytes
from vaekit.errors import CheckpointError

FORMAT = "vaekit-checkpoint"
VERSION = 2
_READS = (1, 2)
_NAME = re.compile(r"^step-(\d{9})\.pt$")
_HEADER_MAX = 4096  # bytes: the header line is far shorter; a file without a newline in them is not v2


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file in ``directory``, oldest first (readable or not)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def encode_checkpoint(payload: dict[str, Any]) -> bytes:
    """The bytes of a version-2 checkpoint file holding ``payload`` (header line + torch.save bytes)."""
    return b"".join(_checkpoint_parts(payload))


def _checkpoint_parts(payload: dict[str, Any]) -> tuple[bytes, memoryview]:
    """(header line with its newline, torch.save bytes): the file's two parts, the payload not copied
    (a checkpoint is several times the model's size; each copy costs milliseconds per save)."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buf)
    blob = buf.getbuffer()
    header = {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob),
              **{k: payload.get(k) for k in ("step", "epoch", "batch", "branch")}}
    return json.dumps(header).encode() + b"\n", blob


def save_checkpoint(directory: str | os.PathLike, step: int, payload: dict[str, Any], keep: int,
                    protect: tuple[int, ...] = ()) -> Path:
    """Write ``payload`` as ``step-<step>.pt`` (temp file + fsync + rename) and prune old ones.

    ``keep`` most recent checkpoints survive, plus any step listed in ``protect``. A full disk
    or an unwritable folder raises StorageError ("no space left on device: ...") and leaves
    the existing checkpoints as they were.
    """
    d = Path(directory)
    path = d / checkpoint_name(step)
    atomic_write_bytes(path, _checkpoint_parts(payload), what="write checkpoint")
    for old_step, old_path in list_checkpoints(d)[:-keep]:
        if old_step not in protect:
            old_path.unlink(missing_ok=True)
    return path


def _split(path: Path, data: bytes) -> tuple[dict[str, Any] | None, bytes]:
    """(header, payload bytes) of a v2 file, (None, data) of a v1 file; CheckpointError when damaged."""
    if not data:
        raise CheckpointError(f"{path} is truncated: it is empty (0 bytes)")
    if data[:2] == b"PK":
        return None, data  # version 1: a zip written by torch.save
    if data[:1] != b"{":
        raise CheckpointError(f"{path} is damaged or not a vaekit checkpoint: it starts with {data[:8]!r}")
    end = data.find(b"\n", 0, _HEADER_MAX)
    if end < 0 and len(data) < _HEADER_MAX:
        raise CheckpointError(f"{path} is truncated: it has {len(data)} bytes and not even its header line is complete")
    try:
        header = json.loads(data[:end]) if end > 0 else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is damaged or not a vaekit checkpoint: its header line cannot be read")
    blob = data[end + 1:]
    size, digest = header.get("size"), header.get("sha256")
    if len(blob) != size:
        raise CheckpointError(f"{path} is truncated or damaged: its payload has {len(blob)} bytes, "
                              f"the header says {size}")
    actual = hashlib.sha256(blob).hexdigest()
    if actual != digest:
        raise CheckpointError(f"{path} is corrupt: the SHA-256 of its payload is {actual}, the header says {digest}")
    return header, blob


def _read_verified(p: Path) -> tuple[dict[str, Any] | None, bytes]:
    """(header, payload bytes) of the file at ``p``, its checksum verified; CheckpointError otherwise."""
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {p}: {exc.strerror or exc}") from exc
    return _split(p, data)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Verify a checkpoint's checksum without unpickling anything; return its header
    (``step``, ``epoch``, ``batch``, ``branch``; for a version-1 file only ``step`` from the name).
    CheckpointError says why a file is unreadable."""
    p = Path(path)
    header, _ = _read_verified(p)
    if header is None:
        m = _NAME.match(p.name)
        return {"format": FORMAT, "version": 1, "step": int(m.group(1)) if m else None}
    return header


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint (checksum verified first; tensors and plain data only: ``weights_only=True``)."""
    p = Path(path)
    _, blob = _read_verified(p)
    try:
        payload = torch.load(io.BytesIO(blob), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/corrupt files
        raise CheckpointError(f"cannot read checkpoint {p}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a vaekit checkpoint")
    if payload.get("version") not in _READS:
        raise CheckpointError(f"{p} has checkpoint version {payload.get('version')}, this vaekit reads {list(_READS)}")
    return payload


def latest_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint in ``directory``, or None when there is no checkpoint file.

    Unreadable newer files are skipped (see :func:`find_resumable` for the list of what was
    skipped and why); CheckpointError when files exist but none can be read."""
    found, _ = find_resumable(directory)
    return found


def find_resumable(directory: str | os.PathLike) -> tuple[tuple[dict[str, Any], Path] | None, list[tuple[Path, str]]]:
    """(newest readable checkpoint as (payload, path) or None when there are no checkpoint files,
    [(path, why) of each newer file that was skipped]).

    Raises CheckpointError listing every file and why it cannot be read when checkpoint files
    exist but none is readable: resuming must not silently start again from step 0."""
    skipped: list[tuple[Path, str]] = []
    files = list_checkpoints(directory)
    for _, path in reversed(files):
        try:
            return (load_checkpoint(path), path), skipped
        except CheckpointError as exc:
            skipped.append((path, str(exc)))
    if files:
        lines = "\n".join(f"  {p.name}: {why}" for p, why in skipped)
        raise CheckpointError(
            f"{Path(directory)} holds {len(files)} checkpoint(s) and none can be read, so the run cannot "
            f"resume:\n{lines}\nrestore them from a backup, or start afresh with --no-resume "
            f"(fit(resume=False)), which keeps this run in the run folder's previous/ folder")
    return None, skipped


def newest_verified(directory: str | os.PathLike, at_most: int | None = None) -> Path | None:
    """The newest checkpoint file (with step <= ``at_most``) whose checksum verifies, or None."""
    for step, path in reversed(list_checkpoints(directory)):
        if at_most is not None and step > at_most:
            continue
        try:
            read_header(path)
        except CheckpointError:
            continue
        return path
    return None
