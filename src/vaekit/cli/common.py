"""Helpers shared by CLI verbs: locating models and runs, loading their data."""

from __future__ import annotations

import errno
import functools
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vaekit.data import load_dataset
from vaekit.data.dataset import ImageDataset, ImageSplit
from vaekit.errors import ModelFormatError, VaekitError
from vaekit.models.base import BaseModel, load_model, read_model_doc


def resolve_model(path: str) -> tuple[Path, Path | None]:
    """(model folder, run folder or None) for a run folder or a model folder."""
    p = Path(path)
    if (p / "model" / "config.json").is_file():
        return p / "model", p
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p, None
    if (p / "checkpoints").is_dir():
        raise ModelFormatError(f"{p} is a run without a final model yet (training did not finish); "
                               f"resume it with `vaekit train {p / 'config.yaml'}`")
    raise ModelFormatError(f"{p} is neither a run folder (with model/) nor a model folder (config.json + "
                           "model.safetensors)")


def open_model(path: str, device: str = "cpu") -> tuple[BaseModel, dict[str, Any], Path | None]:
    """Load the model at ``path`` (run or model folder); also return its metadata and run folder."""
    model_dir, run_dir = resolve_model(path)
    doc = read_model_doc(model_dir)
    return load_model(model_dir, map_location=device), doc.get("metadata", {}), run_dir


def data_for(meta: dict[str, Any], dataset: str | None, data_dir: str | None) -> tuple[ImageDataset, dict[str, Any]]:
    """The dataset a model was trained on (or ``dataset``), and its data settings."""
    data_cfg = dict(meta.get("data") or {})
    name = dataset or data_cfg.get("dataset", "mnist")
    data_cfg["dataset"] = name
    ds = load_dataset(name, data_dir=data_dir or data_cfg.get("data_dir"), sources=data_cfg.get("sources"))
    return ds, data_cfg


def train_examples(ds: ImageDataset, data_cfg: dict[str, Any]) -> ImageSplit:
    """The training examples a model saw: ``train_subset`` of the train split, less its
    ``validation`` hold-out (models saved before the hold-out existed have none)."""
    from vaekit.training.config import DataConfig  # local import: cli.common stays light for the other commands

    dc = DataConfig(train_subset=data_cfg.get("train_subset"), validation=data_cfg.get("validation") or 0,
                    validation_seed=data_cfg.get("validation_seed", 0))
    return dc.train_splits(ds.train)[0]


def check_output_path(path: str | os.PathLike, option: str = "-o", example: str = "out.json") -> Path:
    """Check, before any work, that a file can be written at ``path``: not a folder, and the folder
    it goes in (or the nearest existing one above, the missing ones are created later) is a folder
    a file can be created in (tried for real with a temporary file, removed at once).

    Raises StorageError naming ``option``, the path and the OS reason; returns ``path`` as a Path."""
    from vaekit.atomic import storage_error
    from vaekit.errors import StorageError

    p = Path(path)
    if p.is_dir():
        raise StorageError(f"is a directory: {option} {p} is a folder; give a file path such as {p / example}",
                           errno.EISDIR, str(p))
    existing = next((d for d in p.parents if d.exists()), Path("."))
    if not existing.is_dir():
        raise StorageError(f"not a directory: cannot write {option} {p}: {existing} is a file", errno.ENOTDIR, str(p))
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".vaekit-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise storage_error(exc, p, f"write {option}") from None
    return p


def print_table(rows: list[tuple[str, Any]], title: str | None = None) -> None:
    if title:
        print(title)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        text = f"{v:.4f}" if isinstance(v, float) else str(v)
        print(f"  {k.ljust(width)}  {text}")


def write_json(path: Path, data: dict[str, Any]) -> None:
    from vaekit.atomic import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def db_errors_as(error: type[VaekitError]) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """A command decorator: a database failure (server gone, disk full, a damaged file) is raised as
    ``error`` with a one-line message, which the CLI prints (exit 2)."""
    def wrap(fn: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(fn)
        def run(args: Any) -> int:
            from sqlalchemy.exc import SQLAlchemyError

            try:
                return fn(args)
            except SQLAlchemyError as exc:
                detail = " ".join(str(getattr(exc, "orig", None) or exc).split())
                raise error(f"database error ({type(exc).__name__}): {detail[:300]}") from exc
        return run
    return wrap
