"""The checkpoint history of a run: which checkpoints exist, from which stage, with their health.

``checkpoints/index.json`` lists every checkpoint on disk with its step, epoch, kind
(``initial``, ``step``, ``epoch``, ``final``) and the figures known when it was written:
train KL, test loss/recon/KL, active units and MI. Epoch-end checkpoints form the history:
at most ``keep_history`` of them are kept, thinned so that they stay spread over the run,
plus the initial one. ``choose_fallback`` picks the healthiest checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vaekit.atomic import atomic_write_bytes
from vaekit.errors import InputError

INDEX = "index.json"


class CheckpointHistory:
    """Reads and writes ``index.json`` next to the checkpoints."""

    def __init__(self, directory: str | os.PathLike, keep_history: int = 8):
        self.directory = Path(directory)
        self.keep_history = keep_history
        self.entries: list[dict[str, Any]] = []
        path = self.directory / INDEX
        if path.is_file():
            try:
                self.entries = json.loads(path.read_text())["checkpoints"]
            except (json.JSONDecodeError, KeyError, TypeError):
                self.entries = []

    def record(self, entry: dict[str, Any]) -> None:
        """Add (or replace, same step) an entry: needs ``step``, ``kind``, ``file``."""
        self.entries = [e for e in self.entries if e["step"] != entry["step"]] + [entry]
        self.entries.sort(key=lambda e: e["step"])

    def drop_after(self, step: int) -> list[dict[str, Any]]:
        """Forget (and return) the entries after ``step`` (a resume or a recovery rewinds to it)."""
        gone = [e for e in self.entries if e["step"] > step]
        self.entries = [e for e in self.entries if e["step"] <= step]
        return gone

    def protected_steps(self) -> tuple[int, ...]:
        """Steps whose checkpoints pruning must keep: the initial one and the thinned epoch history."""
        history = [e["step"] for e in self.entries if e["kind"] in ("epoch", "final")]
        while len(history) > self.keep_history and len(history) > 2:
            # drop the interior checkpoint closest to its predecessor: the rest stay spread out
            gaps = [(history[i] - history[i - 1], i) for i in range(1, len(history) - 1)]
            history.pop(min(gaps)[1])
        initial = [e["step"] for e in self.entries if e["kind"] == "initial"]
        return tuple(initial + history)

    def sync(self) -> None:
        """Drop entries whose files are gone, then write the index atomically."""
        self.entries = [e for e in self.entries if (self.directory / e["file"]).is_file()]
        doc = {"checkpoints": self.entries}
        atomic_write_bytes(self.directory / INDEX, (json.dumps(doc, indent=2) + "\n").encode())


def read_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The index entries of a run folder (or of its ``checkpoints`` folder), oldest first."""
    d = Path(run_dir)
    if (d / "checkpoints").is_dir():
        d = d / "checkpoints"
    if not (d / INDEX).is_file():
        raise InputError(f"{run_dir} has no checkpoint index ({d / INDEX}); is it a vaekit run folder?")
    return CheckpointHistory(d).entries


def choose_fallback(entries: list[dict[str, Any]], tolerance: float = 0.02) -> dict[str, Any] | None:
    """The healthiest checkpoint: highest test KL among those whose test reconstruction is
    within ``tolerance`` (relative) of the best one. None when no entry has test figures."""
    if not tolerance >= 0:
        raise InputError(f"tolerance must be >= 0, got {tolerance!r}")
    scored = [e for e in entries if e.get("test_recon") is not None and e.get("test_kl") is not None]
    if not scored:
        return None
    best = min(e["test_recon"] for e in scored)
    limit = best + abs(best) * tolerance
    ok = [e for e in scored if e["test_recon"] <= limit]
    return max(ok, key=lambda e: (e["test_kl"], e["step"]))
