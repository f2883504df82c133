"""Run configuration: which data, which model, how to train. One typed tree, validated on creation.

A run config file (YAML or JSON) has the sections ``data``, ``model`` and ``train``
plus ``name`` and ``out_dir``; the CLI's ``--set section.key=value`` edits it.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vaekit.config import (
    Sources,
    annotate_error,
    field_names,
    from_dict,
    load_yaml,
    parse_override,
    set_by_path,
    to_dict,
)
from vaekit.data import BINARIZE_MODES, LOADERS
from vaekit.data.dataset import ImageDataset, ImageSplit
from vaekit.data.sources import resolve_sources
from vaekit.errors import ConfigError, check_choice, check_positive, describe
from vaekit.models.base import MODEL_REGISTRY, model_config_from_dict
from vaekit.models.vae import VAEConfig
from vaekit.training.monitors import MonitorConfig
from vaekit.training.schedules import KLConfig
from vaekit.training.selection import SelectConfig


@dataclass
class DataConfig:
    """Which dataset and how it is served."""

    dataset: str = "mnist"  # one of vaekit.data.LOADERS
    binarize: Literal["none", "dynamic", "static"] = "none"  # grey levels, fresh draws per batch, or one draw
    binarize_seed: int = 0  # seed of the static draw and of the dynamic draws
    data_dir: str | None = None  # a directory holding the dataset files (else $VAEKIT_DATA)
    sources: str | None = None  # comma-separated sources to try (local,cache,npm,http); None = all
    train_subset: int | None = None  # use only the first N training examples
    test_subset: int | None = None  # use only the first N test examples
    # hold out N training examples (a seeded uniform draw, after train_subset) as a validation
    # split: never trained on; model selection (select.*) scores on it
    validation: int = 0
    validation_seed: int = 0  # seed of that draw

    def __post_init__(self) -> None:
        check_choice("data.dataset", self.dataset, tuple(LOADERS))
        check_choice("data.binarize", self.binarize, BINARIZE_MODES)
        if self.sources is not None:
            resolve_sources(self.sources)
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            if value is not None:
                check_positive(f"data.{name}", value, integer=True)
        check_positive("data.validation", self.validation, allow_zero=True, integer=True)
        check_positive("data.validation_seed", self.validation_seed, allow_zero=True, integer=True)

    def check_sizes(self, dataset: ImageDataset) -> None:
        """ConfigError when ``train_subset`` or ``test_subset`` asks for more examples than the
        dataset's split holds, or ``validation`` would leave nothing to train on."""
        for name, split in (("test_subset", dataset.test), ("train_subset", dataset.train)):
            n = getattr(self, name)
            if n is not None and n > len(split):
                which = name.split("_")[0]
                raise ConfigError(f"data.{name} ({n}) is larger than the {which} split of {dataset.name!r} "
                                  f"({len(split)} examples); use at most {len(split)} or leave it unset (all)")
        self.check_validation(dataset.train)

    def check_validation(self, train: ImageSplit) -> ImageSplit:
        """``train_subset`` of a dataset's train split; ConfigError when ``validation`` would leave
        nothing to train on, or ``train_subset`` is larger than the split."""
        if self.train_subset is not None and self.train_subset > len(train):
            raise ConfigError(f"data.train_subset ({self.train_subset}) is larger than the train split "
                              f"({len(train)} examples)")
        train = train.subset(self.train_subset)
        if self.validation >= len(train):
            raise ConfigError(f"data.validation ({self.validation}) must be smaller than the training split "
                              f"({len(train)} examples{' after data.train_subset' if self.train_subset else ''})")
        return train

    def train_splits(self, train: ImageSplit) -> tuple[ImageSplit, ImageSplit | None]:
        """(training examples, validation examples or None) of a dataset's train split under
        ``train_subset`` and ``validation``."""
        train = self.check_validation(train)
        if not self.validation:
            return train, None
        return train.split_off(self.validation, self.validation_seed)


@dataclass
class TrainConfig:
    """Optimization, logging and checkpointing."""

    epochs: int = 10  # passes over the training split
    max_steps: int | None = None  # stop after this many optimizer steps in all (None: run every epoch)
    batch_size: int = 128  # global batch: summed over processes under torchrun
    lr: float = 1e-3  # Adam learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # Adam moment decay rates
    weight_decay: float = 0.0  # L2 penalty added by Adam
    grad_clip: float | None = None  # clip the global gradient norm to this value (None: off)
    drop_last: bool = False  # drop a final partial batch each epoch
    seed: int = 0  # model init, sampling noise and data order
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast (CUDA only)
    threads: int | None = None  # torch CPU threads (None: torch's default)
    checkpoint_every: int = 1000  # steps between checkpoints (0: only at epoch ends)
    keep_checkpoints: int = 3  # how many recent checkpoints to keep on disk
    keep_history: int = 8  # epoch-end checkpoints kept as the run's history (thinned to stay spread out)
    eval_every: int = 1  # evaluate on the test split every N epochs (0: never during training)
    eval_batch_size: int = 1000  # batch size of evaluation passes
    progress: bool = True  # show a progress bar with live loss terms
    tensorboard: Literal["auto", "on", "off"] | bool = "auto"  # auto: on when tensorboard is installed

    def __post_init__(self) -> None:
        check_positive("train.epochs", self.epochs, integer=True)
        if self.max_steps is not None:
            check_positive("train.max_steps", self.max_steps, integer=True)
        check_positive("train.batch_size", self.batch_size, integer=True)
        check_positive("train.lr", self.lr)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas!r}")
        check_positive("train.weight_decay", self.weight_decay, allow_zero=True)
        if self.grad_clip is not None:
            check_positive("train.grad_clip", self.grad_clip)
        check_positive("train.seed", self.seed, allow_zero=True, integer=True)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        check_choice("train.precision", self.precision, ("fp32", "bf16"))
        if self.threads is not None:
            check_positive("train.threads", self.threads, integer=True)
        check_positive("train.checkpoint_every", self.checkpoint_every, allow_zero=True, integer=True)
        check_positive("train.keep_checkpoints", self.keep_checkpoints, integer=True)
        check_positive("train.keep_history", self.keep_history, integer=True)
        check_positive("train.eval_every", self.eval_every, allow_zero=True, integer=True)
        check_positive("train.eval_batch_size", self.eval_batch_size, integer=True)
        if isinstance(self.tensorboard, bool):  # YAML reads a bare on/off as a boolean
            self.tensorboard = "on" if self.tensorboard else "off"
        check_choice("train.tensorboard", self.tensorboard, ("auto", "on", "off"))


@dataclass
class RunConfig:
    """A whole run: ``out_dir/name`` is the run folder."""

    name: str = "vae"  # run folder name
    out_dir: str = "runs"  # parent folder of runs
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = field(default_factory=VAEConfig)  # the family's config dataclass (model.family picks it)
    train: TrainConfig = field(default_factory=TrainConfig)
    kl: KLConfig = field(default_factory=KLConfig)  # KL schedule, free bits, floor
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  # posterior-collapse monitors and response
    select: SelectConfig = field(default_factory=SelectConfig)  # keep the best weights on validation data

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError(f"name must be a non-empty folder name without '/', got {describe(self.name)}")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


SECTIONS = {"data": DataConfig, "train": TrainConfig, "kl": KLConfig, "monitor": MonitorConfig,
            "select": SelectConfig}


def valid_keys(model_family: str = "vae") -> list[str]:
    """Every settable dotted key, for error messages and ``--help``."""
    model_cls = MODEL_REGISTRY[model_family].config_class if model_family in MODEL_REGISTRY else VAEConfig
    keys = ["name", "out_dir"]
    keys += [f"data.{k}" for k in field_names(DataConfig)]
    keys += [f"model.{k}" for k in field_names(model_cls)]
    keys += [f"train.{k}" for k in field_names(TrainConfig)]
    keys += [f"kl.{k}" for k in field_names(KLConfig)]
    keys += [f"monitor.{k}" for k in field_names(MonitorConfig)]
    keys += [f"select.{k}" for k in field_names(SelectConfig)]
    return keys


def run_config_from_dict(data: dict[str, Any] | None) -> RunConfig:
    """Build and validate a RunConfig from plain data; unknown keys list the valid ones."""
    data = dict(data or {})
    model_data = data.pop("model", None) or {}
    if isinstance(model_data, str):  # `model: vqvae` is short for `model: {family: vqvae}`
        model_data = {"family": model_data}
    if not isinstance(model_data, dict):
        raise ConfigError(f"model must be a mapping or a family name, got {describe(model_data)}")
    family = model_data.get("family", "vae")
    unknown = sorted(set(data) - {"name", "out_dir", *SECTIONS})
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {', '.join(valid_keys(family))}")
    try:
        kwargs: dict[str, Any] = {k: v for k, v in data.items() if k in ("name", "out_dir")}
        for section, cls in SECTIONS.items():
            kwargs[section] = from_dict(cls, data.get(section), prefix=f"{section}.")
        kwargs["model"] = model_config_from_dict(model_data)
        for k in ("name", "out_dir"):
            if k in kwargs and not isinstance(kwargs[k], str):
                raise ConfigError(f"{k} must be a string, got {describe(kwargs[k])}")
        return RunConfig(**kwargs)
    except ConfigError as exc:
        if "unknown config key" in str(exc) and "valid keys" in str(exc):
            raise ConfigError(f"{exc}\nall valid keys: {', '.join(valid_keys(family))}") from None
        raise


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a YAML or JSON config file into plain data."""
    return _read_config(path)[0]


def _read_config(path: str | os.PathLike) -> tuple[dict[str, Any], Sources]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    text = p.read_text()
    sources: Sources = {}
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            data, sources = load_yaml(text, p.name)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}") from exc
    if data is None:
        return {}, sources
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at top level, got {type(data).__name__}")
    return data, sources


def load_run_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Config file (optional) + ``key=value`` overrides -> validated RunConfig.

    A value YAML read as another type than its text suggests (``yes`` -> true, ``010``) is
    shown as written, with its file and line or ``--set``, in the error it causes."""
    data, sources = _read_config(path) if path else ({}, {})
    for text in overrides:
        key, value = parse_override(text)
        if key == "model" and isinstance(value, str):
            key = "model.family"
        if key == "model.family" and isinstance(data.get("model"), str):
            data["model"] = {"family": data["model"]}
        set_by_path(data, key, value)
        raw = text.split("=", 1)[1]
        with contextlib.suppress(yaml.YAMLError):
            sources = {k: v for k, v in sources.items() if k != key and not k.startswith((key + ".", key + "["))}
            for sub, (written, _, tag) in load_yaml(raw)[1].items():
                sources[key + (sub if sub.startswith("[") else f".{sub}" if sub else "")] = (
                    written, f"--set {describe(text)}", tag)
    try:
        return run_config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(annotate_error(str(exc), sources)) from None
