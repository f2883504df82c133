"""The run's metrics log: one JSON object per line (``metrics.jsonl``).

Records carry a ``type`` (``train``, ``eval``, ``event``) and the ``step`` they
belong to. On resume the log is cut back to the checkpoint so replayed steps are
not written twice.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vaekit.atomic import atomic_write_bytes, storage_error


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    return value


class MetricsLog:
    """Append-only JSONL writer with an atomic ``truncate`` for resumes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", buffering=1 << 16)  # noqa: SIM115 (kept open for the run)
        except OSError as exc:
            raise storage_error(exc, self.path, "write the metrics log") from exc

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        except OSError as exc:  # a full buffer is flushed here
            raise storage_error(exc, self.path, "write the metrics log") from exc

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as exc:
            raise storage_error(exc, self.path, "write the metrics log") from exc

    def close(self, quiet: bool = False) -> None:
        """Close the file; ``quiet``: ignore a failing last flush (an error is already on its way)."""
        if self._f.closed:
            return
        try:
            self._f.close()
        except OSError as exc:
            if not quiet:
                raise storage_error(exc, self.path, "write the metrics log") from exc

    def truncate(self, keep: Callable[[dict[str, Any]], bool]) -> int:
        """Rewrite the log keeping only records for which ``keep`` is true; returns how many were dropped."""
        self._f.flush()
        records = read_metrics(self.path)
        kept = [r for r in records if keep(r)]
        self._f.close()
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self._f = open(self.path, "a", buffering=1 << 16)  # noqa: SIM115
        return len(records) - len(kept)


def read_metrics(path: str | os.PathLike, type: str | None = None) -> list[dict[str, Any]]:
    """All records of a metrics log (optionally only those of one ``type``); a torn last line is skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if type is None or rec.get("type") == type:
            out.append(rec)
    return out
