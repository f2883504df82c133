"""The arrays drift detectors are fitted on (``Reference``) and scored on (``Window``).

Both are plain objects holding numpy arrays, one row per image; a field a detector needs and the
object lacks raises InputError naming it. Fields (``N`` images, ``D`` latent dimensions):

``latent`` (N, D) posterior means; ``logvar`` (N, D) posterior log-variances (Gaussian
posteriors); ``recon_mse`` (N,) per-pixel MSE of the reconstruction (squared intensity);
``recon_nats`` (N,) -log p(x|z = posterior mean), nats per image; ``kl`` (N,) KL(q(z|x) || p(z))
nats; ``latent_norm`` (N,) ||posterior mean||_2; ``pixel_mean`` / ``pixel_var`` (N,) the image's
intensity mean and population variance; ``timestamps`` (N,) seconds (Unix time), windows only.

The reference comes from held-out images (the model never trained on them): a reference profile
(vaekit.registry.profile) maps onto :func:`reference_from_arrays` field by field (see
:func:`reference_from_profile`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from vaekit.errors import InputError, describe, finite_array

PER_IMAGE = ("recon_mse", "recon_nats", "kl", "latent_norm", "pixel_mean", "pixel_var")


def _as_array(name: str, value: Any, ndim: int) -> np.ndarray | None:
    return None if value is None else finite_array(name, value, ndim)


@dataclass
class _Arrays:
    latent: np.ndarray | None = None
    logvar: np.ndarray | None = None
    recon_mse: np.ndarray | None = None
    recon_nats: np.ndarray | None = None
    kl: np.ndarray | None = None
    latent_norm: np.ndarray | None = None
    pixel_mean: np.ndarray | None = None
    pixel_var: np.ndarray | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, _as_array(f.name, getattr(self, f.name), 2 if f.name in ("latent", "logvar") else 1))
        if self.logvar is not None and (self.latent is None or self.logvar.shape != self.latent.shape):
            want = None if self.latent is None else self.latent.shape
            raise InputError(f"logvar must have the shape of latent {want}, got {self.logvar.shape}")

    def require(self, name: str, who: str) -> np.ndarray:
        """The array ``name``; InputError naming ``who`` needs it when it is missing."""
        value = getattr(self, name)
        if value is None:
            kind = type(self).__name__
            raise InputError(f"{who} needs {kind}.{name}, which is None; build the {kind.lower()} with {name}=...")
        return value

    def __len__(self) -> int:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                return v.shape[0]
        return 0


@dataclass
class Reference(_Arrays):
    """Per-image arrays of held-out reference images (see the module docstring).

    Not every row of every array need come from the same images: a profile keeps posterior means
    of a 2,000-image sample and per-image errors of all its images, so arrays may differ in N.
    ``intensity_hist`` (K,) is the pooled intensity histogram (fractions summing to 1).
    """

    intensity_hist: np.ndarray | None = None

    def __post_init__(self) -> None:
        hist = self.intensity_hist
        self.intensity_hist = None
        super().__post_init__()
        if hist is not None:
            hist = _as_array("intensity_hist", hist, 1)
            if (hist < 0).any() or abs(hist.sum() - 1) > 1e-6:
                raise InputError(f"intensity_hist must be non-negative fractions summing to 1, got sum {hist.sum()}")
        self.intensity_hist = hist


@dataclass
class Window(_Arrays):
    """Per-request arrays of one window of served images; all present arrays have the same N.

    ``timestamps`` (N,) seconds since the epoch, used by the rolling-mean detector.
    """

    timestamps: np.ndarray | None = None

    def __post_init__(self) -> None:
        ts = self.timestamps
        self.timestamps = None
        super().__post_init__()
        self.timestamps = _as_array("timestamps", ts, 1)
        sizes = {f.name: getattr(self, f.name).shape[0] for f in fields(self) if getattr(self, f.name) is not None}
        if len(set(sizes.values())) > 1:
            raise InputError(f"a window's arrays must all have the same length N, got {sizes}")

    def select(self, index: Any) -> Window:
        """The rows ``index`` (a slice, an index array or a boolean mask) of every array."""
        return Window(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                         for f in fields(self)})


def reference_from_arrays(**arrays: Any) -> Reference:
    """A :class:`Reference` from named arrays (numpy or torch), e.g.
    ``reference_from_arrays(latent=means, recon_mse=mse, latent_norm=norms)``; unknown names are an error."""
    allowed = [f.name for f in fields(Reference)]
    unknown = sorted(set(arrays) - set(allowed))
    if unknown:
        raise InputError(f"unknown reference array(s) {unknown}; allowed: {allowed}")
    return Reference(**arrays)


# the reference profile's array names (vaekit.registry.profile.Profile.arrays) -> Reference fields
PROFILE_FIELDS = {"ref_means": "latent", "recon_mse": "recon_mse", "recon_nll": "recon_nats", "kl": "kl",
                  "mean_norm": "latent_norm", "pixel_mean": "pixel_mean", "pixel_var": "pixel_var",
                  "intensity_hist": "intensity_hist"}


def reference_from_profile(profile: Any) -> Reference:
    """A :class:`Reference` from a reference profile (anything with an ``arrays`` dict of tensors
    named as in vaekit.registry.profile; absent parts stay None)."""
    arrays = getattr(profile, "arrays", None)
    if not isinstance(arrays, dict):
        raise InputError(f"profile must have an 'arrays' dict (a vaekit.registry.profile.Profile), "
                         f"got {describe(profile)}")
    return reference_from_arrays(**{dst: arrays[src] for src, dst in PROFILE_FIELDS.items() if src in arrays})


def window_from_inspection(inspection: Any, images: Any = None, timestamps: Any = None) -> Window:
    """A :class:`Window` from ``model.inspect(x)`` (a vaekit.models.base.Inspection) and, when given,
    the images x (B, C, H, W) for the pixel statistics."""
    pixel_mean = pixel_var = None
    if images is not None:
        flat = images.detach().flatten(1).double()
        pixel_mean, pixel_var = flat.mean(1), flat.var(1, unbiased=False)
    return Window(latent=inspection.latent, logvar=inspection.logvar, recon_mse=inspection.recon_mse,
                  recon_nats=inspection.recon_nats, kl=inspection.kl, latent_norm=inspection.latent_norm,
                  pixel_mean=pixel_mean, pixel_var=pixel_var, timestamps=timestamps)
