"""The interface every model family implements, its registry, and the on-disk format.

A saved model is an artifact of kind ``model`` (:mod:`vaekit.artifact`): ``config.json`` (the
model config, its ``family`` included, and metadata), ``model.safetensors`` (weights), optional
``metrics.json`` and a ``manifest.json`` with the sha256 of every file, verified on load. No
pickled code, ever: loading looks the family up in :data:`MODEL_REGISTRY` and rebuilds the class.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vaekit.artifact import (
    Artifact,
    check_device,
    config_from_artifact,
    load_module_state,
    read_artifact,
    write_artifact,
)
from vaekit.config import from_dict, to_dict
from vaekit.errors import ConfigError, InputError, ModelFormatError, describe
from vaekit.nn.distributions import BernoulliLikelihood, DiagonalGaussian, GaussianLikelihood
from vaekit.objectives.likelihoods import log_standard_normal

MODEL_KIND = "model"  # the artifact kind of a saved model
FORMAT = "vaekit-model"  # config.json's format in version 1 folders (before the manifest), still read
FORMAT_VERSION = 2  # the artifact format version models are written in (vaekit.artifact.FORMAT_VERSION)
MODEL_REGISTRY: dict[str, type[BaseModel]] = {}
CAPABILITIES = ("conditional", "gaussian_posterior", "defines_elbo", "discrete_latent", "has_prior_sampler")


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


@dataclass
class Inspection:
    """Per-example statistics of one deterministic pass (encode, decode at the posterior mean).

    What monitoring, anomaly scores and the reference profile read; ``B`` is the batch size.
    """

    reconstruction: torch.Tensor  # (B, C, H, W) decoder mean at the posterior mean (= reconstruct(x))
    recon_nats: torch.Tensor  # (B,) -log p(x | z = posterior mean), nats summed over pixels
    recon_mse: torch.Tensor  # (B,) mean over pixels of (x - reconstruction)^2
    latent_norm: torch.Tensor  # (B,) ||posterior mean||_2 (VQ-VAE: mean over grid cells of ||z_e||_2)
    latent: torch.Tensor | None = None  # (B, D) posterior mean (a point code for a deterministic AAE)
    logvar: torch.Tensor | None = None  # (B, D) posterior log-variance, Gaussian posteriors only
    kl: torch.Tensor | None = None  # (B,) KL(q(z|x) || p(z)) nats, families that define an ELBO only
    codes: torch.Tensor | None = None  # (B, h, w) int64 code indices, discrete-latent families only


class BaseModel(nn.Module, ABC):
    """The interface every family implements, whatever its latent:

    ``encode(x, y=None)``, ``decode(z, y=None)``, ``sample(n, y=None, generator=None)``,
    ``reconstruct(x, y=None)``, ``inspect(x, y=None)`` and ``forward(x, y=None) -> ModelOutput``.
    ``y`` is the condition of a conditional family and is ignored by the others, so one call
    serves every family. What a family can do is declared on its class (never probed):

    * ``conditional``: encode/decode/reconstruct/sample/forward use the condition ``y``.
    * ``gaussian_posterior``: ``encode`` returns a :class:`DiagonalGaussian` q(z|x) (``mean``,
      ``logvar``, ``kl()``, ``rsample``, ``log_prob``).
    * ``defines_elbo``: a prior density p(z) and an ELBO: ``inspect`` reports the KL and the
      importance-sampled NLL applies (``log_prior(z, y)`` when the prior is not N(0, I)).
    * ``discrete_latent``: ``encode`` returns code indices (B, h, w) int64 (VQ-VAE).
    * ``has_prior_sampler``: ``sample_prior(n, generator)`` draws z ~ p(z), (n, D) (AAE).

    Hooks the trainer uses (override where a family needs them):

    * ``supports_kl_control``: ``forward`` accepts ``kl_control=KLControl(...)`` (schedules,
      free bits, capacity); families without a Gaussian KL term leave it False.
    * ``configure_optimizers(cfg)``: named optimizers (default: one Adam over all parameters).
    * ``custom_train_step`` + ``train_step(...)``: a family with several phases per step
      (adversarial training) runs forward, backward and its optimizers itself.
    * ``on_train_data(n)``: told the training-set size before the first step.
    """

    family: ClassVar[str] = ""
    config_class: ClassVar[type]
    conditional: ClassVar[bool] = False
    gaussian_posterior: ClassVar[bool] = False
    defines_elbo: ClassVar[bool] = False
    discrete_latent: ClassVar[bool] = False
    has_prior_sampler: ClassVar[bool] = False
    supports_kl_control: ClassVar[bool] = False
    custom_train_step: ClassVar[bool] = False
    # parts a fine-tune can train (train.trainable): group name -> state names or their module prefixes
    parameter_group_prefixes: ClassVar[dict[str, tuple[str, ...]]] = {}

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

    def capabilities(self) -> dict[str, bool]:
        """The declared capability flags, by name (what the registry and the service report)."""
        return {name: bool(getattr(self, name)) for name in CAPABILITIES}

    # -- interface -------------------------------------------------------------------------------
    @abstractmethod
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> ModelOutput: ...

    @abstractmethod
    def encode(self, x: torch.Tensor, y: Any = None) -> Any:
        """The latent of x (B, C, H, W): a posterior (``mean`` (B, D)), or code indices (B, h, w)."""

    @abstractmethod
    def decode(self, z: torch.Tensor, y: Any = None) -> Any:
        """p(x|z): a likelihood with ``log_prob(x)`` -> (..., B) nats and ``mean`` (..., C, H, W)."""

    @abstractmethod
    def sample(self, n: int, y: Any = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` generated images, (n, C, H, W), as the decoder's mean."""

    @abstractmethod
    def reconstruct(self, x: torch.Tensor, y: Any = None) -> torch.Tensor:
        """Decoder mean at the posterior mean, same shape as ``x``."""

    @torch.no_grad()
    def inspect(self, x: torch.Tensor, y: Any = None, *, check: bool = True) -> Inspection:
        """Per-example reconstruction error, latent statistics and KL of x (B, C, H, W) in one pass.

        ``reconstruction`` equals :meth:`reconstruct`; ``recon_nats`` is -log p(x|z) at the
        posterior mean (not the ELBO's sampled term), so the figures are deterministic.
        ``check=False`` skips the pass over the values (NaN/inf, range) for an x that a caller
        already checked (the service's gate); shape and dtype are always checked.
        """
        x = self.check_input(x, values=check)
        posterior = self._posterior_of_checked(x, y)
        mean = posterior.mean  # (B, D)
        lik = self._decode_at(mean, y)
        recon = lik.mean
        gaussian = isinstance(posterior, DiagonalGaussian)
        kl = self.kl_per_example(posterior, y) if self.defines_elbo else None
        return Inspection(
            reconstruction=recon, recon_nats=-lik.log_prob(x), recon_mse=(x - recon).pow(2).flatten(1).mean(1),
            latent_norm=mean.norm(dim=1), latent=mean, logvar=posterior.logvar if gaussian else None, kl=kl,
        )

    def _posterior_of_checked(self, x: torch.Tensor, y: Any) -> Any:
        """``encode(x, y)`` for an x that already passed :meth:`check_input` (families skip the second check)."""
        return self.encode(x, y)

    def _decode_at(self, z: torch.Tensor, y: Any) -> Any:
        """The likelihood used for reconstructions at ``z`` (a family with stochastic decoding fixes its seed)."""
        return self.decode(z, y)

    def log_prior(self, z: torch.Tensor, y: Any = None) -> torch.Tensor:
        """log p(z) summed over D: z (..., B, D) -> (..., B); N(0, I) unless the family overrides it."""
        return log_standard_normal(z)

    def kl_per_example(self, posterior: DiagonalGaussian, y: Any = None) -> torch.Tensor:
        """KL(q(z|x) || p(z)) per example, (B,) nats; N(0, I) prior unless the family overrides it."""
        return posterior.kl().sum(1)

    # -- training hooks --------------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[str]]:
        """The family's named parts: group -> names of its parameters and buffers (as in
        ``named_parameters`` / ``named_buffers``); every parameter is in exactly one group. Empty
        when the family declares none (it then cannot be fine-tuned in parts)."""
        names = [n for n, _ in self.named_parameters()] + [n for n, _ in self.named_buffers()]
        return {group: [n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)]
                for group, prefixes in self.parameter_group_prefixes.items()}

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
        """True when ``forward(x, y=labels)`` makes use of labels given to it (always when ``conditional``;
        a label-guided AAE uses them in its regularization terms only). Evaluation passes them then."""
        return self.conditional

    def on_train_data(self, n_train: int) -> None:
        """Called with the number of training examples before training starts."""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.config.input_shape)

    @property
    def device(self) -> torch.device:
        return self._first_parameter().device

    @property
    def dtype(self) -> torch.dtype:
        return self._first_parameter().dtype

    def _first_parameter(self) -> torch.Tensor:
        """``next(self.parameters())`` without walking the module tree each time (the serving path
        asks for the dtype several times per request; a walk costs ~10 us). The owner module and
        the parameter's key are remembered, so ``.to()``, ``load_state_dict`` and a reassigned
        parameter are seen; assigning a submodule on the model forgets them."""
        ref = self.__dict__.get("_first_param_ref")
        if ref is not None:
            p = ref[0]._parameters.get(ref[1])
            if p is not None:
                return p
        for module in self.modules():
            for key, p in module._parameters.items():
                if p is not None:
                    self.__dict__["_first_param_ref"] = (module, key)
                    return p
        raise InputError(f"{type(self).__name__} has no parameters: it has no device or dtype")

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__.pop("_first_param_ref", None)  # a new submodule may hold the first parameter now
        super().__setattr__(name, value)

    def check_input(self, x: Any, name: str = "x", *, values: bool = True) -> torch.Tensor:
        """The one input check of every entry point: x must be a float tensor (B, *input_shape) of finite
        values in [0, 1]; returns it in the model's dtype (other float dtypes are converted).

        ``values=False`` skips the pass over the values (NaN/inf and range), for a caller whose data is
        known good (the trainer's loader). Raises InputError naming what is wrong.
        """
        want = ", ".join(map(str, self.input_shape))
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor of shape (B, {want}), got {type(x).__name__}")
        if not x.is_floating_point():
            hint = " (8-bit images: pass x.float() / 255)" if x.dtype == torch.uint8 else ""
            raise InputError(f"{name} must be a floating-point tensor of values in [0, 1], got dtype {x.dtype}{hint}")
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(f"{name} must have shape (B, {want}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise InputError(f"{name} must hold at least one example, got batch size 0")
        dtype = self.dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        if values:
            check_unit_range(x, name)
        return x

    def check_latent(self, z: Any, name: str = "z") -> torch.Tensor:
        """z must be a float tensor (..., latent_dim) of finite values; returns it in the model's dtype."""
        D = self.config.latent_dim
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            got = f"dtype {z.dtype}" if isinstance(z, torch.Tensor) else type(z).__name__
            raise InputError(f"{name} must be a floating-point tensor of shape (..., {D}), got {got}")
        if z.ndim < 1 or z.shape[-1] != D or z.numel() == 0:
            raise InputError(f"{name} must have shape (B, {D}) (or (..., B, {D})), got {tuple(z.shape)}")
        if not bool(torch.isfinite(z).all()):
            raise InputError(f"{name} holds {int((~torch.isfinite(z)).sum())} NaN or inf values")
        return z.to(self.dtype) if z.dtype != self.dtype else z

    def check_targets(self, x: torch.Tensor) -> None:
        """Raise InputError unless x holds finite values in [0, 1] (one pass over x)."""
        check_unit_range(x, "x")

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


def check_unit_range(x: torch.Tensor, name: str = "x") -> None:
    """Raise InputError unless every value of x is finite and in [0, 1] (one pass: aminmax)."""
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"{name} holds {bad} NaN or inf value{'s' if bad != 1 else ''}; "
                         "values must be finite, in [0, 1]")
    if lo < 0 or hi > 1:
        hint = " (looks like 0..255 pixel values: divide by 255)" if 1 < hi <= 255 and lo >= 0 else ""
        raise InputError(f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}")


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
    device = check_device(map_location)  # before reading or building anything
    art = read_model_artifact(path)
    model = build_model(model_config_from_artifact(art))
    return load_module_state(model, art, device).eval()
