"""The interface every model family implements, its registry, and the on-disk format.

A saved model is an artifact of kind ``model`` (:mod:`vaekit.artifact`): ``config.json`` (the
model config, its ``family`` included, and metadata), ``model.safetensors`` (weights), optional
``metrics.json`` and a ``manifest.json`` with the sha256 of every file, verified on load. No
pickled code, ever: loading looks the family up in :data:`MODEL_REGISTRY` and rebuilds the class.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vaekit.artifact import Artifact, config_from_artifact, load_module_state, read_artifact, write_artifact
from vaekit.config import from_dict, to_dict
from vaekit.errors import ConfigError, InputError, ModelFormatError, describe
from vaekit.nn.distributions import BernoulliLikelihood, GaussianLikelihood

MODEL_KIND = "model"  # the artifact kind of a saved model
FORMAT = "vaekit-model"  # config.json's format in version 1 folders (before the manifest), still read
FORMAT_VERSION = 2  # the artifact format version models are written in (vaekit.artifact.FORMAT_VERSION)
MODEL_REGISTRY: dict[str, type[BaseModel]] = {}


def register_model(name: str):
    """Class decorator adding a model family to :data:`MODEL_REGISTRY` under ``name``."""

    def wrap(cls: type[BaseModel]) -> type[BaseModel]:
        if name in MODEL_REGISTRY and MODEL_REGISTRY[name] is not cls:
            raise ValueError(f"model family {name!r} is already registered")
        cls.family = name
        MODEL_REGISTRY[name] = cls
        return cls

    return wrap


def model_class(family: str) -> type[BaseModel]:
    if family not in MODEL_REGISTRY:
        raise ConfigError(f"model family must be one of {sorted(MODEL_REGISTRY)}, got {family!r}")
    return MODEL_REGISTRY[family]


@dataclass
class ModelOutput:
    """What ``forward`` returns: the loss and every term that makes it.

    All scalars are batch means of per-example sums over pixels/latents, in nats.
    """

    loss: torch.Tensor
    recon: torch.Tensor

    def terms(self) -> dict[str, torch.Tensor]:
        """Scalar terms to log, by name."""
        return {"loss": self.loss, "recon": self.recon}


class BaseModel(nn.Module, ABC):
    """Shared interface: ``forward(x) -> ModelOutput``, ``sample``, ``reconstruct``, save/load.

    Hooks the trainer uses (override where a family needs them):

    * ``needs_labels``: the trainer passes ``y=labels`` to ``forward`` (conditional models).
    * ``supports_kl_control``: ``forward`` accepts ``kl_control=KLControl(...)`` (schedules,
      free bits, capacity); families without a Gaussian KL term leave it False.
    * ``configure_optimizers(cfg)``: named optimizers (default: one Adam over all parameters).
    * ``custom_train_step`` + ``train_step(...)``: a family with several phases per step
      (adversarial training) runs forward, backward and its optimizers itself.
    * ``on_train_data(n)``: told the training-set size before the first step.
    """

    family: ClassVar[str] = ""
    config_class: ClassVar[type]
    needs_labels: ClassVar[bool] = False
    supports_kl_control: ClassVar[bool] = False
    custom_train_step: ClassVar[bool] = False

    def __init__(self, config: Any = None):
        super().__init__()
        self.config = self.resolve_config(config)

    @classmethod
    def resolve_config(cls, config: Any = None) -> Any:
        """``config``, or the family's default config when None; ConfigError for another config type."""
        config = cls.config_class() if config is None else config
        if not isinstance(config, cls.config_class):
            raise ConfigError(f"{cls.__name__} needs a config of type {cls.config_class.__name__}, "
                              f"got {type(config).__name__}")
        return config

    # -- interface -------------------------------------------------------------------------------
    @abstractmethod
    def forward(self, x: torch.Tensor, **kwargs: Any) -> ModelOutput: ...

    @abstractmethod
    def sample(self, n: int) -> torch.Tensor:
        """``n`` generated images, (n, C, H, W), as the decoder's mean."""

    @abstractmethod
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder mean at the posterior mean, same shape as ``x``."""

    # -- training hooks --------------------------------------------------------------------------
    def configure_optimizers(self, cfg: Any) -> dict[str, torch.optim.Optimizer]:
        """Named optimizers built from a TrainConfig; every one is checkpointed."""
        return {"main": torch.optim.Adam(self.parameters(), lr=cfg.lr, betas=cfg.betas,
                                         weight_decay=cfg.weight_decay)}

    def train_step(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   optimizers: dict[str, torch.optim.Optimizer], forward_kwargs: dict[str, Any]) -> ModelOutput:
        """One full step (forward, backward, optimizer steps) for families with ``custom_train_step``.

        ``net`` is the model or its DDP wrapper. Return the output whose ``terms()`` are logged.
        """
        raise NotImplementedError(f"{type(self).__name__} sets custom_train_step but has no train_step")

    @property
    def uses_labels(self) -> bool:
        """True when ``forward(x, y=labels)`` makes use of labels given to it (always when ``needs_labels``;
        a label-guided AAE uses them in its regularization terms only). Evaluation passes them then."""
        return self.needs_labels

    def on_train_data(self, n_train: int) -> None:
        """Called with the number of training examples before training starts."""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.config.input_shape)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def check_input(self, x: Any, name: str = "x") -> torch.Tensor:
        """Raise InputError unless ``x`` is a float tensor (B, *input_shape)."""
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor of shape (B, {self.input_shape}), got {type(x).__name__}")
        if not x.is_floating_point():
            raise InputError(f"{name} must be a floating-point tensor (values in [0, 1]), got dtype {x.dtype}")
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            want = ", ".join(map(str, self.input_shape))
            raise InputError(f"{name} must have shape (B, {want}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise InputError(f"{name} must hold at least one example, got batch size 0")
        return x

    def check_targets(self, x: torch.Tensor) -> None:
        """Raise InputError unless x lies in [0, 1] where the likelihood is Bernoulli (one pass over x).

        Families without a ``likelihood`` config field are Bernoulli.
        """
        if getattr(self.config, "likelihood", "bernoulli") == "bernoulli":
            lo, hi = torch.aminmax(x.detach())
            if lo < 0 or hi > 1:
                raise InputError(f"x must lie in [0, 1] for a Bernoulli likelihood, got values in [{lo:.4g}, {hi:.4g}]")

    def likelihood_from(self, out: torch.Tensor) -> BernoulliLikelihood | GaussianLikelihood:
        """p(x|z) from the decoder's output (..., C, H, W): logits for a Bernoulli likelihood, the mean
        for a Gaussian one (with the family's ``log_sigma``)."""
        if self.config.likelihood == "bernoulli":
            return BernoulliLikelihood(out)
        return GaussianLikelihood(out, self.log_sigma)

    @staticmethod
    def check_count(n: Any, name: str = "n") -> int:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise InputError(f"{name} must be a positive integer, got {describe(n)}")
        return n

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None,
             metrics: dict[str, Any] | None = None) -> Path:
        """Write the model as an artifact folder at ``path``, atomically (a half-written folder never
        replaces a good one); ``metadata`` and ``metrics`` are plain JSON data. Returns ``path``."""
        config = to_dict(self.config)
        assert config.get("family") == self.family, (config.get("family"), self.family)
        return write_artifact(path, MODEL_KIND, config, self.state_dict(), metadata or {}, metrics)


def read_model_artifact(path: str | os.PathLike) -> Artifact:
    """The verified artifact of the model folder at ``path`` (a format v1 folder is read unverified,
    with a LegacyArtifactWarning). ModelFormatError (ArtifactError, ArtifactIntegrityError) otherwise."""
    return read_artifact(path, MODEL_KIND, allow_legacy=True)


def read_model_doc(path: str | os.PathLike) -> dict[str, Any]:
    """The model folder's ``config.json`` content, verified: ``family``, ``config``, ``metadata``
    (plus ``format``, ``format_version``, ``kind``)."""
    art = read_model_artifact(path)
    return {"format": FORMAT, "format_version": art.format_version, "kind": art.kind,
            "family": art.config.get("family"), "config": art.config, "metadata": art.metadata}


def check_class_labels(y: Any, num_classes: int, n: int | None = None, what: str = "class labels") -> torch.Tensor:
    """Integer class labels (B,) in [0, num_classes) as int64; InputError naming the problem otherwise.

    ``n`` (when given) is the batch size the labels must match.
    """
    want = f"({n},)" if n is not None else "(B,)"
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        got = f"dtype {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise InputError(f"{what} must be an integer tensor of shape {want}, got {got}")
    if y.ndim != 1 or (n is not None and y.shape[0] != n):
        raise InputError(f"{what} must have shape {want}, got {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(f"{what} must lie in [0, {num_classes}), got values in [{int(y.min())}, {int(y.max())}]")
    return y.long()


def build_model(config: Any) -> BaseModel:
    """Instantiate the family named by ``config.family``."""
    return model_class(config.family)(config)


def model_config_from_dict(data: dict[str, Any]) -> Any:
    """A family's config dataclass from plain data; ``family`` picks the class (default ``vae``)."""
    family = data.get("family", "vae")
    cls = model_class(family).config_class
    return from_dict(cls, {**data, "family": family}, prefix="model.")


def model_config_from_artifact(art: Artifact) -> Any:
    """The model config saved in ``art``, strictly: every field present and valid (ModelFormatError naming
    the file and the field otherwise), the family one of :data:`MODEL_REGISTRY`."""
    family = art.config.get("family")
    if family not in MODEL_REGISTRY:
        what = "has no 'family' field" if family is None else f"family {describe(family)} is unknown"
        raise ModelFormatError(f"{art.path / 'config.json'}: config {what}; it must be one of {sorted(MODEL_REGISTRY)}")
    return config_from_artifact(MODEL_REGISTRY[family].config_class, art)


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> BaseModel:
    """Load a model folder written by :meth:`BaseModel.save` (eval mode, on ``map_location``).

    The manifest is verified first; the config must hold every field of its family's config
    and the weights exactly the tensors (names, shapes, dtypes) that config builds. Every fault
    (a changed byte, a missing field or file, a truncated or wrong-size weights file, a device that
    does not exist here) raises ModelFormatError (or a subclass) naming the file and the problem.
    """
    art = read_model_artifact(path)
    model = build_model(model_config_from_artifact(art))
    return load_module_state(model, art, map_location).eval()
