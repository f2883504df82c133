"""What every anomaly score shares: capability checks, input checks, errors, and the batched runner.

A score maps a batch of images x (B, C, H, W) in [0, 1] to one float64 number per image (B,),
larger meaning more anomalous. Each score declares the model capabilities it needs (the
class-level flags of the model interface); a model that lacks one gets an
:class:`UnsupportedModelError` naming the score, the family and the missing capability.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from vaekit.errors import InputError, NotFittedError, UnsupportedModelError, describe  # noqa: F401 (re-exported)

# Capabilities a score can require, each read from the model's declared flags (never probed).
CAPABILITIES: dict[str, str] = {
    "gaussian_posterior": "q(z|x) is a DiagonalGaussian (mean, logvar, kl, rsample, log_prob)",
    "defines_elbo": "a prior density p(z) and an ELBO (the importance-sampled likelihood applies)",
    "continuous_latent": "encode(x) returns a posterior with a continuous mean (B, D), not code indices",
}


def has_capability(model: Any, capability: str) -> bool:
    """True when ``model`` has ``capability`` (one of :data:`CAPABILITIES`), read from its declared flags.

    Flags are read on the instance: a family may declare one per config (the AAE's Gaussian encoder).
    """
    if capability not in CAPABILITIES:
        raise InputError(f"capability must be one of {sorted(CAPABILITIES)}, got {describe(capability)}")
    if capability == "continuous_latent":
        return not bool(model.discrete_latent)
    return bool(getattr(model, capability))


def require(model: Any, capabilities: tuple[str, ...], score: str) -> None:
    """Raise UnsupportedModelError unless ``model`` has every one of ``capabilities``."""
    missing = [c for c in capabilities if not has_capability(model, c)]
    if missing:
        family = getattr(model, "family", "") or type(model).__name__
        needs = "; ".join(f"{c}: {CAPABILITIES[c]}" for c in missing)
        raise UnsupportedModelError(f"score {score!r} needs {', '.join(missing)}, which model family "
                                    f"{family!r} does not have ({needs})")


def check_images(model: Any, x: Any, name: str = "x") -> torch.Tensor:
    """The model's one input check: a float tensor (B, *input_shape) of finite values in [0, 1],
    returned in the model's dtype (InputError otherwise)."""
    return model.check_input(x, name)


def check_labels(model: Any, y: Any, n: int) -> torch.Tensor | None:
    """``y`` for a conditional model (required, one row per image); None for the others, which ignore
    it as the model interface does."""
    if not model.conditional:
        return None
    if y is None:
        raise InputError(f"{type(model).__name__} is conditional: pass y (labels or condition vectors, "
                         f"one per image), got None")
    if not isinstance(y, torch.Tensor) or y.ndim < 1 or y.shape[0] != n:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise InputError(f"y must be a tensor with one row per image ({n}), got {got}")
    return y


def check_positive_int(name: str, value: Any, *, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (upper is not None and value > upper):
        allowed = f"an integer in [1, {upper}]" if upper is not None else "a positive integer"
        raise InputError(f"{name} must be {allowed}, got {describe(value)}")
    return value


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 open_low: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if open_low else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        allowed = " and ".join(p for p in (lo, hi) if p) or "finite"
        raise InputError(f"{name} must be a finite number {allowed}, got {describe(value)}")
    return float(value)


def encode(model: Any, x: torch.Tensor, y: torch.Tensor | None) -> Any:
    return model.encode(x, y)


def decode(model: Any, z: torch.Tensor, y: torch.Tensor | None) -> Any:
    return model.decode(z, y)


def batches(x: torch.Tensor, y: torch.Tensor | None, batch_size: int
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(x, y) in slices of ``batch_size`` images, moved to nothing (the caller places them)."""
    for lo in range(0, x.shape[0], batch_size):
        yield x[lo : lo + batch_size], (y[lo : lo + batch_size] if y is not None else None)


class Score:
    """One per-image anomaly score. Subclasses set ``name``, ``requires`` and implement ``compute``.

    ``__init__`` stores and validates the score's parameters (all JSON-safe); a score with
    ``needs_fit`` learns statistics from in-distribution reference images in ``fit`` (attributes
    ending in ``_``) and raises NotFittedError when used before. ``params()`` and ``state()`` are
    plain JSON-safe dicts; :func:`vaekit.anomaly.scores.score_from_dict` rebuilds a score from them.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    needs_fit: ClassVar[bool] = False
    stochastic: ClassVar[bool] = False  # draws posterior samples (seeded by the runner)
    grad: ClassVar[bool] = False  # needs autograd (Likelihood Regret)

    def params(self) -> dict[str, Any]:
        """The constructor arguments, JSON-safe."""
        return {}

    def state(self) -> dict[str, Any]:
        """Fitted statistics, JSON-safe ({} for a score without ``fit``)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned."""
        if state:
            raise InputError(f"score {self.name!r} has no fitted state, got keys {sorted(state)}")

    @property
    def fitted(self) -> bool:
        return not self.needs_fit

    def check_model(self, model: Any) -> None:
        require(model, self.requires, self.name)

    def fit(self, model: Any, reference: torch.Tensor, y: torch.Tensor | None = None, *,
            batch_size: int = 256, seed: int = 0) -> Score:
        """Learn the score's statistics from in-distribution images (a no-op for most scores)."""
        return self

    def compute(self, model: Any, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """(B,) scores of one checked batch on the model's device (no_grad unless ``grad``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"
