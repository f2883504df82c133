"""The checkpoint history of a run: which checkpoints exist, from which stage, with their health.

``checkpoints/index.json`` lists every checkpoint on disk with its step, epoch, kind
(``initial``, ``step``, ``epoch``, ``final``) and the figures known when it was written:
train KL, test loss/recon/KL, active units and MI. Epoch-end checkpoints form the history:
at most ``keep_history`` of them are kept, thinned so that they stay spread over the run,
plus the initial one. ``choose_fallback`` picks the healthiest checkpoint.

A damaged or missing index (a torn write is impossible, a disk error or a hand edit is not) is
rebuilt from the checkpoint files themselves (their headers carry step, epoch and position; each
file's checksum is verified) and the run's ``metrics.jsonl`` (test, KL, AU and MI figures).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vaekit.atomic import atomic_write_bytes
from vaekit.errors import CheckpointError, InputError
from vaekit.training.checkpoint import list_checkpoints, read_header
from vaekit.training.metrics_log import read_metrics

INDEX = "index.json"


def _index_problem(path: Path) -> str | None:
    """Why ``index.json`` cannot be used (None when it is fine)."""
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"is not valid JSON ({exc})"
    entries = doc.get("checkpoints") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("step"), int) and isinstance(e.get("file"), str)
            and isinstance(e.get("kind"), str) for e in entries):
        return "does not hold a list of checkpoints with step, kind and file"
    return None


def rebuild_entries(directory: str | os.PathLike) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """(index entries rebuilt from the checkpoint files in ``directory`` and the run's metrics log,
    [(file, why) of each file that cannot be read]). Figures not in the log stay None."""
    d = Path(directory)
    metrics = read_metrics(d.parent / "metrics.jsonl")
    evals = {(r.get("step"), r.get("branch", 0)): r for r in metrics if r.get("type") == "eval"}
    monitor = [r for r in metrics if r.get("type") == "monitor"]
    train = [r for r in metrics if r.get("type") == "train" and isinstance(r.get("kl"), int | float)]
    entries, unreadable = [], []
    for step, path in list_checkpoints(d):
        try:
            header = read_header(path)
        except CheckpointError as exc:
            unreadable.append((path.name, str(exc)))
            continue
        branch = header.get("branch") or 0
        kind = "initial" if step == 0 else "epoch" if header.get("batch") == 0 else "step"
        ev = evals.get((step, branch), {})
        kls = [r["kl"] for r in train if r["step"] <= step and r.get("branch", 0) == branch][-50:]
        latent = [r for r in monitor if r.get("step", 0) <= step and r.get("branch", 0) == branch]
        entries.append({"step": step, "epoch": header.get("epoch"), "kind": kind, "file": path.name,
                        "branch": branch, "train_kl": sum(kls) / len(kls) if kls else None,
                        **{f"test_{k}": ev.get(k) for k in ("loss", "recon", "kl", "neg_elbo")},
                        "au": latent[-1].get("au") if latent else None, "mi": latent[-1].get("mi") if latent else None,
                        "latent_step": latent[-1].get("step") if latent else None, "rebuilt": True})
    return entries, unreadable


class CheckpointHistory:
    """Reads and writes ``index.json`` next to the checkpoints."""

    def __init__(self, directory: str | os.PathLike, keep_history: int = 8):
        self.directory = Path(directory)
        self.keep_history = keep_history
        self.entries: list[dict[str, Any]] = []
        self.problem: str | None = None  # why the index on disk could not be used (it was rebuilt)
        self.unreadable: list[tuple[str, str]] = []  # (file, why) of checkpoint files a rebuild skipped
        path = self.directory / INDEX
        if path.is_file():
            self.problem = _index_problem(path)
            if self.problem is None:
                self.entries = json.loads(path.read_text())["checkpoints"]
        files = list_checkpoints(self.directory)
        if path.is_file() and self.problem is None and files and not self.entries:
            self.problem = f"lists no checkpoints though {self.directory} holds {len(files)}"
        elif not path.is_file() and files:
            self.problem = "is missing"
        if self.problem is not None:
            self.entries, self.unreadable = rebuild_entries(self.directory)

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


def open_history(run_dir: str | os.PathLike) -> CheckpointHistory:
    """The checkpoint history of a run folder (or of its ``checkpoints`` folder), rebuilt from the
    files when the index is damaged (``.problem`` says why). InputError when there is neither an
    index nor a checkpoint; CheckpointError when a damaged index cannot be rebuilt (no readable
    checkpoint file), listing each file and why."""
    d = Path(run_dir)
    if (d / "checkpoints").is_dir():
        d = d / "checkpoints"
    if not (d / INDEX).is_file() and not list_checkpoints(d):
        raise InputError(f"{run_dir} has no checkpoint index ({d / INDEX}) and no checkpoints; "
                         f"is it a vaekit run folder?")
    history = CheckpointHistory(d)
    if history.problem is not None and not history.entries:
        files = "".join(f"\n  {name}: {why}" for name, why in history.unreadable) or " (no checkpoint files)"
        raise CheckpointError(f"{d / INDEX} {history.problem} and cannot be rebuilt: no checkpoint file in {d} "
                              f"can be read:{files}")
    return history


def read_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The index entries of a run folder (or of its ``checkpoints`` folder), oldest first; see
    :func:`open_history` for a damaged index."""
    return open_history(run_dir).entries


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
