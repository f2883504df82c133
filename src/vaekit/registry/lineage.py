"""Where a model came from: the run folder, its resolved config, the training data, the evaluation figures.

A run folder (``vaekit train`` output) holds ``config.json`` / ``config.yaml`` (the resolved run config; older
runs have only the YAML), ``config.revisions.json`` (every config the run was trained with, when it changed
mid-run) and ``model/`` (the saved model with ``metrics.json``); a bare model folder carries the data and train
settings in its ``config.json`` metadata. :func:`read_source` reads either into a :class:`Source`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vaekit.errors import InputError, ModelFormatError, describe


@dataclass
class Source:
    """A model folder to register and the lineage read from it (and from its run folder, when it has one)."""

    model_dir: Path
    run_dir: Path | None = None
    family: str | None = None
    run_config: dict[str, Any] | None = None
    revisions: list[dict[str, Any]] | None = None  # the run's config revisions, when it changed mid-run
    data: dict[str, Any] | None = None  # the data settings (dataset, train_subset, validation, ...)
    metrics: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def canonical_hash(value: Any) -> str:
    """sha256 (hex) of ``value`` as canonical JSON (sorted keys, no spaces): equal configs give equal hashes."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def read_source(path: str | os.PathLike) -> Source:
    """The model folder at ``path`` (a run folder's ``model/`` or a model folder itself) and its lineage.

    The model folder is read with :func:`vaekit.artifact.read_artifact`, so it is verified against its manifest
    (a changed byte is an ArtifactIntegrityError naming the file; a format v1 folder without a manifest is an
    ArtifactError saying how to upgrade it).
    """
    from vaekit.artifact import read_artifact
    from vaekit.models.base import MODEL_KIND

    p = Path(path)
    if (p / "model" / "config.json").is_file():
        model_dir, run_dir = p / "model", p
    elif (p / "config.json").is_file():
        model_dir, run_dir = p, None
    elif (p / "checkpoints").is_dir():
        raise InputError(f"source {str(p)!r} is a run without a final model (training did not finish)")
    else:
        raise InputError(f"source must be a run folder (with model/) or a model folder (with config.json), "
                         f"got {str(p)!r}")
    art = read_artifact(model_dir, MODEL_KIND)
    run_config, revisions = (_run_config(run_dir), _revisions(run_dir)) if run_dir is not None else (None, None)
    data = (run_config or {}).get("data") or art.metadata.get("data")
    return Source(model_dir=model_dir, run_dir=run_dir, family=art.config.get("family"), run_config=run_config,
                  revisions=revisions, data=dict(data) if data else None, metrics=art.metrics, metadata=art.metadata)


def _run_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's resolved config: ``config.json`` (the newest revision), else ``config.yaml`` (older runs)."""
    for name, parse in (("config.json", json.loads), ("config.yaml", yaml.safe_load)):
        path = run_dir / name
        if path.is_file():
            try:
                doc = parse(path.read_text())
            except (json.JSONDecodeError, yaml.YAMLError) as exc:
                raise ModelFormatError(f"{path} is damaged ({exc}); it records how the run was trained") from None
            if not isinstance(doc, dict):
                raise ModelFormatError(f"{path} must hold a mapping, got {describe(doc)}")
            return doc
    return None


def _revisions(run_dir: Path) -> list[dict[str, Any]] | None:
    """Every config the run was trained with (``config.revisions.json``) when there was more than one."""
    path = run_dir / "config.revisions.json"
    if not path.is_file():
        return None
    try:
        revs = json.loads(path.read_text())["revisions"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelFormatError(f"{path} is damaged ({exc}); it records how the run was trained") from None
    return list(revs) if isinstance(revs, list) and len(revs) > 1 else None


def training_examples(data: dict[str, Any]):
    """The dataset and the (training, validation or None) examples a run with these data settings used."""
    from vaekit.data import load_dataset
    from vaekit.training.config import DataConfig

    dc = DataConfig(dataset=data.get("dataset", "mnist"), train_subset=data.get("train_subset"),
                    validation=data.get("validation") or 0, validation_seed=data.get("validation_seed", 0),
                    data_dir=data.get("data_dir"), sources=data.get("sources"))
    ds = load_dataset(dc.dataset, data_dir=dc.data_dir, sources=dc.sources)
    train, validation = dc.train_splits(ds.train)
    return ds, train, validation


def data_fingerprint(data: dict[str, Any], train) -> str:
    """sha256 of the training examples themselves (uint8 images and int64 labels, in order) and the binarization.

    Taken from the bytes, not the settings: two Fashion-MNIST variants with the same settings hold different
    images, and equal fingerprints mean the same examples wherever the files were read from.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"dataset": data.get("dataset", "mnist"), "shape": list(train.images.shape),
                         "binarize": data.get("binarize", "none"), "binarize_seed": data.get("binarize_seed", 0)},
                        sort_keys=True).encode())
    h.update(train.images.contiguous().numpy().tobytes())
    h.update(train.labels.contiguous().numpy().tobytes())
    return h.hexdigest()


def held_out_images(spec: str, data: dict[str, Any] | None, run_dir: Path | None, examples=None):
    """(images (N, C, H, W) float in [0, 1], labels (N,), description) of the held-out split ``spec`` names.

    ``spec`` is ``"validation"`` (the run's ``data.validation`` hold-out, drawn exactly as the trainer drew it) or
    ``"DATASET:test"`` (a dataset's test split). A training split is refused: a reference profile describes
    images the model was not fitted on. ``examples`` (optional) returns :func:`training_examples` of ``data``
    already loaded.
    """
    from vaekit.data import LOADERS, load_dataset
    from vaekit.data.dataset import to_unit_float

    if not isinstance(spec, str) or not spec:
        raise InputError(f"profile_data must be 'validation' or 'DATASET:test', got {describe(spec)}")
    if spec == "validation":
        if not data or not data.get("validation"):
            raise InputError("profile_data 'validation' needs a run trained with data.validation > 0 (held-out "
                             "training images); this source has none: pass profile_data='DATASET:test'")
        _, _, split = examples() if examples is not None else training_examples(data)
        where = f"data.validation of {run_dir}" if run_dir else "data.validation"
    else:
        dataset, sep, split_name = spec.partition(":")
        if not sep or dataset not in LOADERS:
            raise InputError(f"profile_data must be 'validation' or 'DATASET:test' with DATASET one of "
                             f"{sorted(LOADERS)}, got {spec!r}")
        if split_name != "test":
            what = ("the training split is what the model was fitted on; a reference profile needs held-out "
                    "images" if split_name == "train" else f"unknown split {split_name!r}")
            raise InputError(f"profile_data {spec!r}: {what}; use '{dataset}:test' or 'validation'")
        d = data or {}
        ds = load_dataset(dataset, data_dir=d.get("data_dir") if d.get("dataset") == dataset else None)
        split, where = ds.test, spec
    assert split is not None
    return to_unit_float(split.images), split.labels, f"{where} ({len(split)} images)"
