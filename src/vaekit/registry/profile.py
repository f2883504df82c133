"""The monitoring reference profile of a model: what its inputs, errors and codes look like on
held-out images, stored inside the model's artifact and read back with one call.

    profile = compute_profile(model, held_out_images, source="data.validation of runs/vae (5000)")
    attach_profile("runs/vae/model", profile)          # or dst=... to write a copy (the registry does)
    profile = read_profile("runs/vae/model")            # verified with the rest of the artifact

The images must be held out: the model was not trained on them (the run's ``data.validation``
split, or a named split the user passes). The profile never picks them itself, so it is never
silently the training set; ``source`` records where they came from.

Contents (``N`` held-out images, ``D`` latent dims, ``S`` = min(sample_size, N), ``K`` codes):

* per example (N,), with quantiles p50 p90 p95 p99 p99.9, mean, std, min, max:
  ``recon_mse`` per-pixel MSE of ``reconstruct(x)`` (squared intensity, pixels in [0, 1]);
  ``recon_nll`` -log p(x|z) at the posterior mean (nats per image; z = the code grid for VQ-VAE);
  ``kl`` KL(q(z|x) || N(0, I)) summed over dims (nats; Gaussian posteriors only);
  ``mean_norm`` Euclidean norm of the posterior mean (Gaussian posteriors and point codes);
  ``code_norm`` Euclidean norm of the quantized code grid z_q (VQ-VAE only);
  ``pixel_mean`` / ``pixel_var`` mean and (population) variance of the image's pixels.
* ``agg_mean`` / ``agg_var`` (D,): mean and variance of the aggregated posterior
  q(z) = mean over x of q(z|x): agg_var = E_x[var(z|x)] + Var_x[mean(z|x)] (population, ddof 0);
  for point codes E_x[var] = 0. ``kl_per_dim`` (D,): mean KL of each dim (Gaussian only).
* ``ref_means`` (S, D): posterior means of S examples drawn without replacement (``ref_index``
  (S,) says which, seeded), the reference sample for KS and MMD tests.
* ``intensity_hist`` (32,): fraction of all pixels in each of 32 equal bins over [0, 1]
  (the last bin includes 1.0).
* VQ-VAE: ``code_counts`` (K,) uses of each code over all grid positions, ``codebook_norms`` (K,);
  ``code_usage`` (fraction of codes used) and ``code_perplexity`` (exp entropy) in the JSON.
* ``latency_ms``: batch-1 forward (encode, decode at the posterior mean, log p(x|z)) wall time,
  p50 and p99 over ``latency_runs`` runs after warm-up, on the machine that computed the profile.

``absent`` names each part that does not apply to the family, and why.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from vaekit.artifact import Artifact, read_artifact, rewrite_artifact
from vaekit.errors import ArtifactError, InputError, describe

PROFILE_FORMAT = "vaekit-profile"
PROFILE_VERSION = 1
PROFILE_JSON = "profile/profile.json"
PROFILE_ARRAYS = "profile/profile.safetensors"
QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)
# anomaly detectors fitted at registration (p99 on the held-out images): the cheap reconstruction score
# every family has, and the ensemble that separates Fashion-MNIST from MNIST both ways (docs/anomaly.md)
DETECTOR_SCORES = ("mse", "ensemble")
QUANTILE_NAMES = ("p50", "p90", "p95", "p99", "p99.9")
HIST_BINS = 32
PER_EXAMPLE = ("recon_mse", "recon_nll", "kl", "mean_norm", "code_norm", "pixel_mean", "pixel_var")
# every array a profile can hold; each is either in ``arrays`` or named in ``absent`` with the reason
ARRAYS = PER_EXAMPLE + ("agg_mean", "agg_var", "kl_per_dim", "ref_means", "ref_index", "intensity_hist",
                        "code_counts", "codebook_norms")


@dataclass
class Profile:
    """A reference profile. ``arrays`` maps names (see the module docstring) to CPU tensors;
    ``quantiles[name]`` and ``summary[name]`` describe each per-example array; ``absent[part]``
    says why a part is missing; ``info`` holds the family, ``n``, ``source``, the machine and when."""

    info: dict[str, Any]
    arrays: dict[str, torch.Tensor]
    quantiles: dict[str, dict[str, float]] = field(default_factory=dict)
    summary: dict[str, dict[str, float]] = field(default_factory=dict)
    codes: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, Any] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)
    detectors: dict[str, dict[str, Any]] = field(default_factory=dict)  # score -> AnomalyDetector.to_dict()

    def has(self, name: str) -> bool:
        """True when array ``name`` applies to the family (else ``absent[name]`` says why)."""
        return name in self.arrays

    def to_files(self) -> dict[str, bytes]:
        """The two files stored in the artifact: ``profile/profile.json`` and ``profile/profile.safetensors``."""
        doc = {"format": PROFILE_FORMAT, "format_version": PROFILE_VERSION, "info": self.info,
               "quantiles": self.quantiles, "summary": self.summary, "codes": self.codes,
               "latency_ms": self.latency_ms, "absent": self.absent, "detectors": self.detectors,
               "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                          for k, v in sorted(self.arrays.items())}}
        arrays = {k: v.detach().cpu().contiguous() for k, v in self.arrays.items()}
        return {PROFILE_JSON: (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode(),
                PROFILE_ARRAYS: save_safetensors(arrays, metadata={"format": PROFILE_FORMAT})}

    @classmethod
    def from_artifact(cls, art: Artifact) -> Profile:
        """The profile stored in ``art`` (verified by the manifest); ArtifactError when it has none
        or its two files disagree."""
        if PROFILE_JSON not in art.files or PROFILE_ARRAYS not in art.files:
            raise ArtifactError(f"artifact {art.path} has no reference profile ({PROFILE_JSON}); compute one with "
                                "vaekit.registry.profile.compute_profile on held-out images and attach_profile it")
        doc = art.read_json(PROFILE_JSON)
        where = art.path / PROFILE_JSON
        if doc.get("format") != PROFILE_FORMAT or doc.get("format_version") != PROFILE_VERSION:
            raise ArtifactError(f"{where}: format {doc.get('format')!r} v{doc.get('format_version')!r}, expected "
                                f"{PROFILE_FORMAT!r} v{PROFILE_VERSION}")
        try:
            arrays = load_safetensors(art.read_bytes(PROFILE_ARRAYS))
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise ArtifactError(f"{art.path / PROFILE_ARRAYS} is not a readable safetensors file: {exc}") from exc
        listed = doc.get("arrays")
        have = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in arrays.items()}
        if listed != have:
            raise ArtifactError(f"{where} lists arrays {describe(listed)} but {PROFILE_ARRAYS} holds {describe(have)}")
        keys = ("info", "quantiles", "summary", "codes", "latency_ms", "absent")
        missing = [k for k in keys if not isinstance(doc.get(k), dict)]
        if missing:
            raise ArtifactError(f"{where}: missing or non-object field(s) {missing}")
        detectors = doc.get("detectors", {})  # profiles written before detectors were stored have none
        if not isinstance(detectors, dict):
            raise ArtifactError(f"{where}: detectors must be an object, got {describe(detectors)}")
        return cls(arrays=arrays, detectors=detectors, **{k: doc[k] for k in keys})

    def detector(self, score: str, model: Any) -> Any:
        """The fitted :class:`~vaekit.anomaly.AnomalyDetector` for ``score`` (its p99 threshold on these
        held-out images), rebuilt for ``model``; ArtifactError naming the stored scores when absent."""
        from vaekit.anomaly import AnomalyDetector

        if score not in self.detectors:
            why = self.info.get("detectors_absent", {}).get(score, "it was not fitted at registration")
            raise ArtifactError(f"the profile has no {score!r} detector ({why}); stored: {sorted(self.detectors)}")
        return AnomalyDetector.from_dict(self.detectors[score], model)


# -- computing -------------------------------------------------------------------------------------
def quantiles(values: np.ndarray | torch.Tensor) -> dict[str, float]:
    """p50, p90, p95, p99, p99.9 of ``values`` (numpy's default linear interpolation)."""
    q = np.quantile(np.asarray(values, dtype=np.float64), QUANTILES)
    return {name: float(v) for name, v in zip(QUANTILE_NAMES, q, strict=True)}


def _summary(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max())}


def _check_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {describe(value)}")
    return value


def _check_images(model: Any, images: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(images, torch.Tensor):
        raise InputError(f"images must be a float tensor (N, C, H, W) in [0, 1], got {type(images).__name__}")
    model.check_input(images, "images")
    if images.shape[0] < 2:
        raise InputError(f"images must hold at least 2 held-out examples, got {images.shape[0]}")
    if model.conditional:
        if labels is None:
            raise InputError(f"a conditional {model.family} model needs labels (N,) for its held-out images, got None")
        if not isinstance(labels, torch.Tensor) or labels.shape[0] != images.shape[0]:
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise InputError(f"labels must be a tensor with one row per image ({images.shape[0]}), got {got}")
    else:
        labels = None  # unconditional families ignore labels (a label-guided AAE uses them in training only)
    return images, labels


@torch.no_grad()
def _score(model: Any, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per-example terms of one batch x (B, C, H, W): each (B,), plus posterior means/vars (B, D) or codes."""
    kw = {"y": y} if y is not None else {}
    out: dict[str, torch.Tensor] = {}
    q = model.encode(x, **kw)
    if model.discrete_latent:
        codebook = model.quantizer.codebook  # (K, Dc): the code vectors the indices select
        out["codes"] = q  # (B, h, w) int64
        out["code_norm"] = codebook[q].flatten(1).norm(dim=1)  # ||z_q|| over the whole grid
        lik = model.decode(q, **kw)
    else:
        out["means"] = q.mean  # (B, D)
        out["mean_norm"] = q.mean.norm(dim=1)
        if model.gaussian_posterior:
            out["vars"] = q.logvar.exp()
            out["kl_dims"] = q.kl()  # (B, D) nats
            out["kl"] = out["kl_dims"].sum(1)
        lik = model.decode(q.mean, **kw)
    out["recon_nll"] = -lik.log_prob(x)
    out["recon_mse"] = (model.reconstruct(x, **kw) - x).pow(2).flatten(1).mean(1)
    flat = x.flatten(1)
    out["pixel_mean"] = flat.mean(1)
    out["pixel_var"] = flat.var(1, unbiased=False)
    out["hist"] = torch.histc(flat.float(), bins=HIST_BINS, min=0.0, max=1.0)
    return out


def _latency(model: Any, x: torch.Tensor, y: torch.Tensor | None, runs: int, warmup: int) -> dict[str, Any]:
    """Batch-1 forward wall time (encode, decode at the posterior mean, log p(x|z)) in milliseconds."""
    kw = {"y": y} if y is not None else {}
    cuda = x.device.type == "cuda"

    @torch.no_grad()
    def once() -> None:
        q = model.encode(x, **kw)
        z = q if model.discrete_latent else q.mean
        model.decode(z, **kw).log_prob(x)
        if cuda:
            torch.cuda.synchronize(x.device)

    for _ in range(warmup):
        once()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        once()
        times.append((time.perf_counter() - t0) * 1e3)
    t = np.asarray(times)
    return {"p50": float(np.quantile(t, 0.5)), "p99": float(np.quantile(t, 0.99)), "runs": runs, "warmup": warmup,
            "what": "batch-1 encode + decode at the posterior mean + log p(x|z), no grad",
            "device": str(x.device), "threads": torch.get_num_threads(), "host": platform.node(),
            "machine": platform.machine(), "processor": platform.processor(), "torch": torch.__version__}


def compute_profile(
    model: Any,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    source: str | None = None,
    sample_size: int = 2000,
    batch_size: int = 256,
    latency_runs: int = 100,
    latency_warmup: int = 10,
    seed: int = 0,
    detector_scores: tuple[str, ...] = DETECTOR_SCORES,
) -> Profile:
    """The reference profile of ``model`` on held-out ``images`` (N, C, H, W) in [0, 1].

    ``images`` must not be training images (the caller chooses them: ``data.validation`` of
    the run, or a named split; nothing here falls back to the training set). ``labels`` (N,)
    are required by conditional families and ignored otherwise. ``source`` describes where the
    images came from (stored in ``info``). ``sample_size`` posterior means (drawn with ``seed``)
    form the reference sample. ``detector_scores`` are fitted as p99 anomaly detectors
    (:class:`vaekit.anomaly.AnomalyDetector`) on the same images and stored as ``detectors``, so a
    service reads the threshold and the score with the profile; a score the family cannot compute
    is named in ``info["detectors_absent"]`` with the reason. Runs in eval mode without gradients on the
    model's device; the model's train/eval mode is restored. See the module docstring for every
    field and unit.
    """
    images, labels = _check_images(model, images, labels)
    _check_int("sample_size", sample_size)
    _check_int("batch_size", batch_size)
    _check_int("latency_runs", latency_runs)
    _check_int("latency_warmup", latency_warmup, low=0)
    _check_int("seed", seed, low=0)
    if source is not None and not isinstance(source, str):
        raise InputError(f"source must be a string describing the held-out images, got {describe(source)}")
    was_training = model.training
    model.eval()
    try:
        parts = _score_all(model, images, labels, batch_size)
        dev = model.device
        y1 = labels[:1].to(dev) if labels is not None else None
        latency = _latency(model, images[:1].to(dev), y1, latency_runs, latency_warmup)
    finally:
        model.train(was_training)
    profile = _assemble(model, parts, len(images), source, sample_size, seed, latency)
    _fit_detectors(profile, model, images, labels, detector_scores, source)
    return profile


def _fit_detectors(profile: Profile, model: Any, images: torch.Tensor, labels: torch.Tensor | None,
                   scores: tuple[str, ...], source: str | None) -> None:
    from vaekit.anomaly import AnomalyDetector
    from vaekit.errors import UnsupportedModelError

    for score in scores:
        try:
            det = AnomalyDetector(model, score=score, percentile=99.0).fit(images, labels, source=source)
        except UnsupportedModelError as exc:
            profile.info.setdefault("detectors_absent", {})[score] = str(exc)
            continue
        profile.detectors[score] = det.to_dict()


def _score_all(model: Any, images: torch.Tensor, labels: torch.Tensor | None,
               batch_size: int) -> dict[str, torch.Tensor]:
    dev = model.device
    chunks: dict[str, list[torch.Tensor]] = {}
    hist = torch.zeros(HIST_BINS, dtype=torch.float64)
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(dev)
        y = labels[i : i + batch_size].to(dev) if labels is not None else None
        out = _score(model, x, y)
        hist += out.pop("hist").double().cpu()
        for k, v in out.items():
            chunks.setdefault(k, []).append(v.detach().cpu())
    parts = {k: torch.cat(v) for k, v in chunks.items()}
    parts["hist"] = hist
    return parts


def _assemble(model: Any, parts: dict[str, torch.Tensor], n: int, source: str | None, sample_size: int, seed: int,
              latency: dict[str, Any]) -> Profile:
    arrays: dict[str, torch.Tensor] = {}
    absent: dict[str, str] = {}
    for name in PER_EXAMPLE:
        if name in parts:
            arrays[name] = parts[name].double()
    if model.discrete_latent:
        why = "discrete latent (VQ-VAE): a grid of code indices, no posterior density or mean vector"
        for name in ("kl", "kl_per_dim", "mean_norm", "agg_mean", "agg_var", "ref_means", "ref_index"):
            absent[name] = why + ("; see code_norm" if name == "mean_norm" else "; see code_counts")
    else:
        for name in ("code_norm", "code_counts", "codebook_norms"):
            absent[name] = f"{model.family} has no codebook"
        means = parts["means"].double()  # (N, D)
        var_of_means = means.var(0, unbiased=False)
        if model.gaussian_posterior:
            arrays["agg_var"] = parts["vars"].double().mean(0) + var_of_means
            arrays["kl_per_dim"] = parts["kl_dims"].double().mean(0)
        else:
            why = f"{model.family} has point codes (a deterministic encoder): no KL to the prior"
            absent.update(kl=why, kl_per_dim=why)
            arrays["agg_var"] = var_of_means  # each q(z|x) is a point: E[var] = 0
        arrays["agg_mean"] = means.mean(0)
        s = min(sample_size, n)
        index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:s].sort().values
        arrays["ref_index"] = index
        arrays["ref_means"] = means[index].float()
    codes: dict[str, float] = {}
    if model.discrete_latent:
        k = model.config.codebook_size
        counts = torch.bincount(parts["codes"].flatten(), minlength=k).double()
        arrays["code_counts"] = counts
        arrays["codebook_norms"] = model.quantizer.codebook.detach().double().cpu().norm(dim=1)
        p = counts / counts.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        codes = {"codebook_size": k, "code_usage": float((counts > 0).double().mean()),
                 "code_perplexity": float(entropy.exp()), "unused_codes": int((counts == 0).sum())}
    arrays["intensity_hist"] = parts["hist"] / parts["hist"].sum()
    per_example = [k for k in PER_EXAMPLE if k in arrays]
    for k in per_example:
        bad = int((~torch.isfinite(arrays[k])).sum())
        if bad:
            raise InputError(f"the model gives a non-finite {k} for {bad} of the {n} held-out images; "
                             "a profile of such a model would be meaningless")
    assert set(arrays) | set(absent) == set(ARRAYS), set(ARRAYS) ^ (set(arrays) | set(absent))
    info = {"family": model.family, "n": n, "source": source, "sample_size": sample_size, "seed": seed,
            "latent_dim": int(parts["means"].shape[1]) if "means" in parts else None,
            "input_shape": list(model.input_shape), "likelihood": getattr(model.config, "likelihood", "bernoulli"),
            "gaussian_posterior": bool(model.gaussian_posterior), "discrete_latent": bool(model.discrete_latent),
            "conditional": bool(model.conditional), "per_example": per_example,
            "created": datetime.now(UTC).isoformat(timespec="seconds"), "vaekit": _vaekit_version()}
    return Profile(info=info, arrays=arrays,
                   quantiles={k: quantiles(arrays[k].numpy()) for k in per_example},
                   summary={k: _summary(arrays[k].numpy()) for k in per_example},
                   codes=codes, latency_ms=latency, absent=absent)


def _vaekit_version() -> str:
    from vaekit import __version__

    return __version__


# -- storing ---------------------------------------------------------------------------------------
def attach_profile(folder: str | os.PathLike, profile: Profile, dst: str | os.PathLike | None = None) -> Path:
    """Store ``profile`` in the model artifact at ``folder`` (verified first), rewritten atomically in
    place or written to ``dst``; the profile files are covered by the manifest like every other.
    ArtifactError when the artifact's family is not the profile's."""
    if not isinstance(profile, Profile):
        raise InputError(f"profile must be a Profile (from compute_profile), got {type(profile).__name__}")
    art = read_artifact(folder, "model")
    family = art.config.get("family")
    if family != profile.info.get("family"):
        raise ArtifactError(f"{folder} holds a {family!r} model; the profile was computed for "
                            f"{profile.info.get('family')!r}")
    return rewrite_artifact(folder, dst, files=profile.to_files())


def read_profile(folder: str | os.PathLike) -> Profile:
    """The reference profile stored in the artifact at ``folder``, verified with the whole artifact."""
    return Profile.from_artifact(read_artifact(folder))




__all__ = ["Profile", "attach_profile", "compute_profile", "quantiles", "read_profile"]
