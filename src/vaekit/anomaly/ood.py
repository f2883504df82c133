"""OOD evaluation: out-of-distribution image sets and a report of every score's detection figures.

:func:`ood_datasets` gives the OOD sets the CLI and the benchmark use: another dataset's test split
(``mnist``, ``fashion-mnist``) or ``corrupted`` copies of the in-distribution test images
(all-black, additive Gaussian noise, inverted, rotated 90 degrees). :func:`ood_report` scores in-
and out-of-distribution images with each score, reports AUROC, AUPR and FPR at 95% TPR
(:mod:`vaekit.anomaly.metrics`), the cost per image, and draws the score histograms as a PNG.
"""

from __future__ import annotations

import io
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaekit.anomaly.base import check_images, check_number
from vaekit.anomaly.metrics import ood_metrics
from vaekit.anomaly.scores import as_score, score_images, score_to_dict
from vaekit.atomic import atomic_write_bytes
from vaekit.errors import InputError, describe

OOD_DATA = ("mnist", "fashion-mnist", "corrupted")
CORRUPTIONS = ("black", "noise", "inverted", "rotated")
DEFAULT_SCORES = ("mse", "recon", "neg_elbo", "nll", "kl", "latent_norm", "mahalanobis", "complexity",
                  "typicality", "ensemble")


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit grid (multiples of 1/255), as stored images are."""
    return torch.round(x.clamp(0, 1) * 255) / 255


def corrupt(images: torch.Tensor, kind: str, *, noise_std: float = 0.3, seed: int = 0) -> torch.Tensor:
    """A corrupted copy of images (N, C, H, W) in [0, 1], on the 8-bit grid.

    ``black``: all zeros; ``noise``: x + N(0, noise_std^2) per pixel, clipped; ``inverted``: 1 - x;
    ``rotated``: rotated 90 degrees counter-clockwise (square images).
    """
    if kind not in CORRUPTIONS:
        raise InputError(f"corruption must be one of {list(CORRUPTIONS)}, got {describe(kind)}")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"images must be a float tensor (N, C, H, W), got {got}")
    if kind == "black":
        return torch.zeros_like(images)
    if kind == "noise":
        check_number("noise_std", noise_std, low=0.0, open_low=True)
        g = torch.Generator().manual_seed(seed)
        return quantize(images + noise_std * torch.randn(images.shape, generator=g).to(images))
    if kind == "inverted":
        return quantize(1.0 - images)
    if images.shape[-1] != images.shape[-2]:
        raise InputError(f"rotation needs square images, got {tuple(images.shape[-2:])}")
    return torch.rot90(images, 1, dims=(-2, -1)).contiguous()


def ood_datasets(name: str, in_images: torch.Tensor | None = None, *, n: int | None = None,
                 noise_std: float = 0.3, seed: int = 0, data_dir: str | os.PathLike | None = None
                 ) -> dict[str, torch.Tensor]:
    """OOD image sets by name, each (N, 1, 28, 28) float in [0, 1].

    ``mnist`` / ``fashion-mnist``: that dataset's test split (first ``n`` images);
    ``corrupted``: {"black", "noise", "inverted", "rotated"} copies of ``in_images`` (first ``n``).
    """
    if name not in OOD_DATA:
        raise InputError(f"ood data must be one of {list(OOD_DATA)}, got {describe(name)}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise InputError(f"n must be a positive integer or None, got {describe(n)}")
    if name == "corrupted":
        if in_images is None:
            raise InputError("ood data 'corrupted' needs in_images (the in-distribution test images)")
        base = in_images[:n] if n else in_images
        return {k: corrupt(base, k, noise_std=noise_std, seed=seed) for k in CORRUPTIONS}
    from vaekit.data import load_dataset
    from vaekit.data.dataset import to_unit_float

    test = load_dataset(name, data_dir=data_dir).test
    return {name: to_unit_float(test.images[:n] if n else test.images)}


def time_costs(model: Any, score: Any, x: torch.Tensor, batch_size: int, repeats: int) -> tuple[float, float]:
    """(wall, cpu) median seconds per image of scoring ``repeats`` batches of ``batch_size`` images of x,
    after one warm-up batch: the whole call, input checks and seeding included. The CPU time is this
    thread's (``time.thread_time``): with one torch thread it leaves out the waits for a core that
    other processes hold, which the wall time counts."""
    walls, cpus = [], []
    score_images(model, x[:batch_size], score, batch_size=batch_size)  # warm-up
    for i in range(repeats):
        xi = x[(i * batch_size) % max(1, x.shape[0] - batch_size + 1):][:batch_size]
        w, c = time.perf_counter(), time.thread_time()
        score_images(model, xi, score, batch_size=batch_size)
        cpus.append((time.thread_time() - c) / xi.shape[0])
        walls.append((time.perf_counter() - w) / xi.shape[0])
    return float(np.median(walls)), float(np.median(cpus))


def time_per_image(model: Any, score: Any, x: torch.Tensor, batch_size: int, repeats: int) -> float:
    """Median wall seconds per image (see :func:`time_costs`)."""
    return time_costs(model, score, x, batch_size, repeats)[0]


def ood_report(
    model: Any,
    in_images: Any,
    out_images: Any,
    scores: Any = DEFAULT_SCORES,
    *,
    reference: Any = None,
    png_path: str | os.PathLike | None = None,
    batch_size: int = 256,
    seed: int = 0,
    time_batches: tuple[int, ...] = (),
    time_repeats: int = 20,
    skip_unsupported: bool = True,
) -> dict[str, Any]:
    """Detection figures of each score: in-distribution ``in_images`` against ``out_images``.

    ``out_images`` is one tensor or a dict {name: tensor}. ``scores`` are names, Score objects or
    score dicts. Scores with statistics not yet fitted are fit on ``reference`` (held-out
    in-distribution images, required then; never the OOD images). ``time_batches`` lists batch
    sizes at which to time each score (median seconds per image over ``time_repeats`` batches).
    A score the model does not support is recorded as skipped with the reason (``skip_unsupported``)
    or raises. Returns {"scores": {name: {"params", "seconds", "ood": {set: {auroc, aupr, fpr95}},
    "in_mean", "out_mean"}}, "n_in", "n_out"}; writes the histograms to ``png_path`` when given.
    """
    from vaekit.anomaly.base import UnsupportedModelError

    in_images = check_images(model, in_images, "in_images")
    outs = out_images if isinstance(out_images, dict) else {"ood": out_images}
    if not outs:
        raise InputError("out_images must hold at least one image set")
    outs = {str(k): check_images(model, v, f"out_images[{k!r}]") for k, v in outs.items()}
    if isinstance(scores, str | dict) or not scores:
        raise InputError(f"scores must be a non-empty list of scores, got {describe(scores)}")
    if reference is not None:
        reference = check_images(model, reference, "reference")
    result: dict[str, Any] = {"n_in": int(in_images.shape[0]), "n_out": {k: int(v.shape[0]) for k, v in outs.items()},
                              "scores": {}}
    hist: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
    for spec in scores:
        s = as_score(spec)
        key = s.name if s.name not in result["scores"] else f"{s.name}#{len(result['scores'])}"
        try:
            s.check_model(model)
        except UnsupportedModelError as exc:
            if not skip_unsupported:
                raise
            result["scores"][key] = {"skipped": str(exc)}
            continue
        t0 = time.perf_counter()
        if not s.fitted:
            if reference is None:
                raise InputError(f"score {s.name!r} is fit on reference images: pass reference= (held-out "
                                 f"in-distribution images)")
            s.fit(model, reference, batch_size=batch_size, seed=seed)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        s_in = score_images(model, in_images, s, batch_size=batch_size, seed=seed).numpy()
        s_out = {k: score_images(model, v, s, batch_size=batch_size, seed=seed + 1).numpy() for k, v in outs.items()}
        n_total = in_images.shape[0] + sum(v.shape[0] for v in outs.values())
        entry: dict[str, Any] = {
            "params": score_to_dict(s, state=False)["params"],
            "fit_seconds": fit_s,
            "seconds_per_image": (time.perf_counter() - t0) / n_total,
            "in_mean": float(s_in.mean()),
            "out_mean": {k: float(v.mean()) for k, v in s_out.items()},
            "ood": {k: ood_metrics(s_in, v) for k, v in s_out.items()},
        }
        for b in time_batches:
            entry[f"seconds_per_image_batch{b}"] = time_per_image(model, s, in_images, b, time_repeats)
        result["scores"][key] = entry
        hist[key] = (s_in, s_out)
    if png_path is not None and hist:
        save_histograms(hist, png_path)
        result["png"] = str(png_path)
    return result


def save_histograms(hist: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]], path: str | os.PathLike,
                    title: str | None = None) -> Path:
    """One panel per score: the in-distribution histogram against each OOD set's (PNG, atomic). The x range
    is at most twice the in-distribution range beyond it on each side; scores outside land in the edge bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(hist)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (name, (s_in, s_out)) in zip(axes.flat, hist.items(), strict=False):
        allv = np.concatenate([s_in, *s_out.values()])
        lo, hi = np.percentile(allv, [0.5, 99.5])
        # keep the in-distribution histogram readable: far-away OOD mass piles up in the edge bins
        in_lo, in_hi = np.percentile(s_in, [0.5, 99.5])
        span = in_hi - in_lo
        lo, hi = max(lo, in_lo - 2 * span), min(hi, in_hi + 2 * span)
        if not hi > lo:
            lo, hi = float(allv.min()) - 0.5, float(allv.max()) + 0.5
        bins = np.linspace(lo, hi, 50)
        ax.hist(np.clip(s_in, lo, hi), bins=bins, density=True, alpha=0.6, label="in-distribution")
        for k, v in s_out.items():
            ax.hist(np.clip(v, lo, hi), bins=bins, density=True, alpha=0.45, histtype="stepfilled", label=k)
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
