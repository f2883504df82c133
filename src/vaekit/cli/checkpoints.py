"""``vaekit checkpoints RUN [--fallback]``: the run's checkpoint history with its health figures.

A damaged or missing ``checkpoints/index.json`` is rebuilt from the checkpoint files (and saved,
unless a training holds the run folder); when no file can be read it says so and exits 2.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

from vaekit.errors import RunLockedError, StorageError
from vaekit.training.history import choose_fallback, open_history
from vaekit.training.run_folder import RunLock


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoints", help="list a run's checkpoints with KL, AU, MI and test loss")
    p.add_argument("run", help="run folder")
    p.add_argument("--fallback", action="store_true",
                   help="name the healthiest checkpoint: highest test KL among those whose test "
                        "reconstruction is within --tolerance of the best")
    p.add_argument("--tolerance", type=float, default=0.02, help="relative reconstruction tolerance (default 0.02)")
    p.set_defaults(func=run)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _save_rebuilt(history, run_dir: Path) -> str:
    """Write a rebuilt index back when no training holds the folder; say what was done."""
    try:
        with warnings.catch_warnings(), RunLock(run_dir):
            warnings.simplefilter("ignore")  # a stale lock.json: taking it over briefly is harmless
            history.sync()
    except RunLockedError:
        return "not saved: a training holds the run folder and rewrites the index at its next checkpoint"
    except StorageError as exc:
        return f"not saved: {exc}"
    return f"saved to {history.directory / 'index.json'}"


def run(args: argparse.Namespace) -> int:
    history = open_history(args.run)  # CheckpointError when the index is damaged and no file can be read
    entries = history.entries
    if history.problem is not None:
        skipped = "".join(f"\n  skipped {name}: {why}" for name, why in history.unreadable)
        saved = _save_rebuilt(history, history.directory.parent)
        print(f"note: {history.directory / 'index.json'} {history.problem}; rebuilt from {len(entries)} "
              f"checkpoint file(s) and the metrics log ({saved}){skipped}")
    if not entries:
        print(f"{args.run}: the checkpoint index lists no checkpoints")
        return 1
    headers = ["step", "epoch", "kind", "train KL", "test KL", "test recon", "test loss", "AU", "MI", "file"]
    rows = [[_fmt(e["step"]), _fmt(e.get("epoch")), e["kind"], _fmt(e.get("train_kl")), _fmt(e.get("test_kl")),
             _fmt(e.get("test_recon")), _fmt(e.get("test_loss")), _fmt(e.get("au")), _fmt(e.get("mi")), e["file"]]
            for e in entries]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    if args.fallback:
        best = choose_fallback(entries, args.tolerance)
        if best is None:
            print("fallback: none (no checkpoint has test figures; they are recorded at epoch ends)")
            return 1
        print(f"fallback: {best['file']} (step {best['step']}, test KL {_fmt(best['test_kl'])}, "
              f"test recon {_fmt(best['test_recon'])})")
    return 0
