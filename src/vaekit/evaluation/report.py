"""Run a chosen set of evaluations on a model and write ``report.json``, ``report.md`` and PNG images.

Parts (``EvalConfig.metrics``):

* ``elbo``: test-split ELBO breakdown (recon, KL, KL per dim), nats per example and bits/dim.
* ``latent``: active units (Burda et al. 2015, threshold 0.01) and I(x; z) (He et al. 2019).
* ``nll``: importance-sampled NLL with ``k`` samples, nats and bits/dim with standard errors.
* ``recon``: MSE and SSIM of reconstructions.
* ``fid``: FID of ``fid_samples`` samples against the test split on the vaekit extractor, with the
  train-vs-test floor (MNIST and Fashion-MNIST; needs ``vaekit fid-extractor train <dataset>``).
* ``mig``: both MIG estimators (dSprites only).
* ``images``: samples, inputs above reconstructions, interpolations, traversals ordered by KL.

A part that does not apply to a model or dataset is recorded as skipped, with the reason, in both
files; nothing is silently left out. Every part records its wall time.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vaekit.atomic import atomic_write_bytes
from vaekit.data.dataset import ImageDataset, eval_loader
from vaekit.errors import ConfigError, InputError, ModelFormatError, describe
from vaekit.evaluation.elbo import evaluate_elbo
from vaekit.evaluation.images import save_grid
from vaekit.evaluation.latent import active_units, mutual_information
from vaekit.evaluation.nll import nll, supports_nll
from vaekit.evaluation.reconstruction import reconstruction_metrics
from vaekit.evaluation.traversals import dims_by_kl, interpolations, reconstruction_rows, traversals

METRICS = ("elbo", "latent", "nll", "recon", "fid", "mig", "images")
DEFAULT_METRICS = ("elbo", "latent", "recon", "images")
FID_DATASETS = ("mnist", "fashion-mnist")


@dataclass
class EvalConfig:
    """What to evaluate and how. Validated on creation."""

    metrics: tuple[str, ...] = DEFAULT_METRICS  # parts to run, from METRICS ("all" expands to every part)
    k: int = 5000  # importance samples per example for the NLL
    nll_examples: int | None = None  # first N test examples for the NLL (None: the whole test split)
    max_samples: int = 1024  # decoder evaluations per NLL chunk (cache-sized: larger chunks run slower on CPU)
    fid_samples: int = 10000  # generated images for FID
    recon_examples: int | None = None  # first N test examples for MSE/SSIM (None: all)
    mig_histogram_images: int = 10000  # dSprites images for the histogram MIG
    mig_sampling_images: int | None = 100_000  # dSprites images for the sampling MIG (None: all 737,280)
    batch_size: int = 500  # evaluation batch size
    seed: int = 0  # every random draw of the evaluation derives from it
    extractor_path: str | None = None  # FID extractor folder (None: the cache location)
    traversal_dims: int = 10  # latent dims shown in traversals (largest KL first)
    test_examples: int | None = None  # evaluate on the first N test examples only (None: the whole split)

    def __post_init__(self) -> None:
        metrics = tuple(self.metrics)
        if metrics == ("all",):
            metrics = METRICS
        bad = [m for m in metrics if m not in METRICS]
        if bad or not metrics:
            raise ConfigError(f"metrics must be a non-empty list drawn from {list(METRICS)} (or 'all'), "
                              f"got {metrics!r}")
        self.metrics = metrics
        for name in ("k", "max_samples", "fid_samples", "mig_histogram_images", "batch_size", "traversal_dims"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {describe(v)}")
        for name in ("nll_examples", "recon_examples", "mig_sampling_images", "test_examples"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {describe(v)}")
        if self.fid_samples < 2:
            raise ConfigError(f"fid_samples must be >= 2, got {self.fid_samples}")


class SkippedError(Exception):
    """A part does not apply to this model or dataset; the message says why."""


@dataclass
class _Context:
    model: Any
    dataset: ImageDataset
    binarize: str
    config: EvalConfig
    out_dir: Path
    results: dict[str, Any]

    def test_batches(self, n: int | None = None):
        split = self.dataset.test.subset(min(n, len(self.dataset.test)) if n else None)
        return eval_loader(split, self.config.batch_size, self.binarize, self.config.seed, self.model.device).epoch(0)

    def first_test_images(self, n: int) -> torch.Tensor:
        return next(iter(self.test_batches(n)))[0][:n]


def _bits_per_dim(nats: float, model: Any) -> float:
    return nats / (math.prod(model.input_shape) * math.log(2.0))


def _part_elbo(ctx: _Context) -> dict[str, Any]:
    res = evaluate_elbo(ctx.model, ctx.test_batches(), seed=ctx.config.seed)
    if "neg_elbo" in res:
        res["neg_elbo_bits_per_dim"] = _bits_per_dim(res["neg_elbo"], ctx.model)
    return res


@torch.no_grad()
def _posteriors(ctx: _Context) -> tuple[torch.Tensor, torch.Tensor]:
    means, logvars = [], []
    for x, y in ctx.test_batches():
        q = ctx.model.encode(x, y)
        means.append(q.mean.cpu())
        logvars.append(q.logvar.cpu())
    return torch.cat(means), torch.cat(logvars)


def _part_latent(ctx: _Context) -> dict[str, Any]:
    if not ctx.model.gaussian_posterior:
        raise SkippedError(f"{type(ctx.model).__name__} has no Gaussian posterior (active units and MI need one)")
    was = ctx.model.training
    ctx.model.eval()
    try:
        mean, logvar = _posteriors(ctx)
    finally:
        ctx.model.train(was)
    g = torch.Generator().manual_seed(ctx.config.seed)
    return {"active_units": active_units(mean), "latent_dim": int(mean.shape[1]),
            "mutual_information": mutual_information(mean, logvar, generator=g), "n": int(mean.shape[0]),
            "au_threshold": 0.01}


def _part_nll(ctx: _Context) -> dict[str, Any]:
    ok, why = supports_nll(ctx.model)
    if not ok:
        raise SkippedError(why)
    c = ctx.config
    res = nll(ctx.model, ctx.test_batches(c.nll_examples), k=c.k, seed=c.seed, max_samples=c.max_samples,
              max_examples=c.nll_examples)
    res["threads"] = torch.get_num_threads()
    return res


def _part_recon(ctx: _Context) -> dict[str, Any]:
    n = ctx.config.recon_examples
    return reconstruction_metrics(ctx.model, ctx.test_batches(n), max_examples=n)


@torch.no_grad()
def _samples(model: Any, n: int, seed: int, batch: int = 1000) -> torch.Tensor:
    """``n`` samples drawn under a forked RNG seeded with ``seed`` (the caller's stream is untouched)."""
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return torch.cat([model.sample(min(batch, n - i)).clamp(0, 1).cpu() for i in range(0, n, batch)])


def _part_fid(ctx: _Context) -> dict[str, Any]:
    from vaekit.evaluation.fid import fid, fid_floor, load_extractor

    name = ctx.dataset.name
    if name not in FID_DATASETS:
        raise SkippedError(f"FID is defined here for {list(FID_DATASETS)} (one vaekit extractor each), not {name!r}")
    if ctx.model.conditional:
        raise SkippedError("conditional model: sample() needs labels; evaluate class-conditional samples separately")
    try:
        ext = load_extractor(name, ctx.config.extractor_path)
    except ModelFormatError as exc:
        raise SkippedError(str(exc)) from None
    images = _samples(ctx.model, ctx.config.fid_samples, ctx.config.seed)
    return {"fid": fid(images, name, ext, data=ctx.dataset), "samples": ctx.config.fid_samples,
            "fid_floor_train_vs_test": fid_floor(name, ext, data=ctx.dataset),
            "extractor": str(ext.artifact.path if ext.artifact else ""), "extractor_test_accuracy": ext.test_accuracy,
            "extractor_weights_hash": ext.weights_hash(), "against": f"{name} test split ({len(ctx.dataset.test)})"}


def _part_mig(ctx: _Context) -> dict[str, Any]:
    from vaekit.evaluation.mig import dsprites_mig

    if ctx.dataset.name != "dsprites":
        raise SkippedError(f"MIG needs ground-truth factors; vaekit has them for dsprites, not {ctx.dataset.name!r}")
    if ctx.model.discrete_latent:
        raise SkippedError(f"{type(ctx.model).__name__} has a discrete latent; MIG needs continuous codes (B, D)")
    c = ctx.config
    return dsprites_mig(ctx.model, n_histogram=c.mig_histogram_images, n_sampling=c.mig_sampling_images, seed=c.seed)


def _part_images(ctx: _Context) -> dict[str, Any]:
    model, out = ctx.model, ctx.out_dir
    files: dict[str, str] = {}
    notes: dict[str, str] = {}
    seed = ctx.config.seed
    if model.conditional:
        notes["samples"] = "conditional model: unconditional samples not drawn"
    else:
        files["samples"] = save_grid(_samples(model, 64, seed), out / "samples.png", nrow=8).name
    x = ctx.first_test_images(32)
    files["reconstructions"] = save_grid(reconstruction_rows(model, x, 8), out / "reconstructions.png", nrow=8).name
    if not model.discrete_latent and not model.conditional:
        pairs = ctx.first_test_images(16)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            inter = interpolations(model, pairs[:8], pairs[8:16], steps=10)
            kl = ctx.results.get("elbo", {}).get("kl_per_dim")
            D = model.encode(x[:1]).mean.shape[1]
            dims = dims_by_kl(kl, ctx.config.traversal_dims) if kl else list(range(min(D, ctx.config.traversal_dims)))
            trav = traversals(model, x[:1], dims, span=3.0, steps=9)
        files["interpolations"] = save_grid(inter, out / "interpolations.png", nrow=10).name
        files["traversals"] = save_grid(trav, out / "traversals.png", nrow=9).name
        notes["traversals"] = (f"rows: latent dims {dims} " + ("(largest test KL first)" if kl else "(in index order)")
                               + ", each from -3 to +3 around the first test image's posterior mean")
    else:
        notes["interpolations"] = "needs an unconditional encoder"
    return {"files": files, "notes": notes}


PARTS = {"elbo": _part_elbo, "latent": _part_latent, "nll": _part_nll, "recon": _part_recon, "fid": _part_fid,
         "mig": _part_mig, "images": _part_images}


def evaluate_model(
    model: Any,
    dataset: ImageDataset,
    out_dir: str | os.PathLike,
    config: EvalConfig | None = None,
    *,
    binarize: str = "none",
    name: str = "",
    progress: bool = False,
    stem: str = "report",
) -> dict[str, Any]:
    """Run ``config.metrics`` on ``model`` over ``dataset``'s test split; write the report into ``out_dir``.

    ``binarize`` is how test images are served (``none``, or ``dynamic``/``static``, which both
    mean one fixed Bernoulli draw from ``config.seed``): use the model's training setting.
    Returns the report dictionary (also written to ``out_dir/<stem>.json`` and ``<stem>.md``).
    """
    config = config or EvalConfig()
    if not isinstance(dataset, ImageDataset):
        raise InputError(f"dataset must be an ImageDataset, got {type(dataset).__name__}")
    if tuple(dataset.image_shape) != tuple(model.input_shape):
        raise InputError(f"dataset images have shape {dataset.image_shape}, the model expects {model.input_shape}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.test_examples is not None and config.test_examples < len(dataset.test):
        dataset = ImageDataset(dataset.name, dataset.train, dataset.test.subset(config.test_examples), dataset.classes,
                               dataset.provenance, dataset.info)
    ctx = _Context(model, dataset, binarize, config, out, {})
    timings: dict[str, float] = {}
    order = [m for m in METRICS if m in config.metrics]  # elbo before images (traversals use its KL)
    for part in order:
        t0 = time.perf_counter()
        try:
            ctx.results[part] = PARTS[part](ctx)
        except SkippedError as why:
            ctx.results[part] = {"skipped": str(why)}
        timings[part] = round(time.perf_counter() - t0, 2)
        if progress:
            print(f"  {part}: {timings[part]:.1f} s", flush=True)
    report = {
        "model": name or type(model).__name__, "family": model.family,
        "dataset": dataset.name, "dataset_provenance": dataset.provenance, "split": "test", "binarize": binarize,
        "config": asdict(config), "metrics": ctx.results, "timings_s": timings,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(), "device": str(model.device)},
    }
    atomic_write_bytes(out / f"{stem}.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(out / f"{stem}.md", render_markdown(report).encode())
    return report


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render_markdown(report: dict[str, Any]) -> str:
    """A readable report: one section per part, numbers with their units, images embedded."""
    m = report["metrics"]
    lines = [f"# Evaluation of {report['model']} on {report['dataset']}", "",
             f"Test split, binarize={report['binarize']}, seed {report['config']['seed']}; "
             f"torch {report['machine']['torch']}, {report['machine']['threads']} thread(s), "
             f"{report['machine']['device']}. Log-likelihoods in nats per example.", ""]

    def section(title: str, part: str) -> dict[str, Any] | None:
        if part not in m:
            return None
        lines.extend([f"## {title}", ""])
        if "skipped" in m[part]:
            lines.extend([f"Skipped: {m[part]['skipped']}", ""])
            return None
        return m[part]

    if (r := section("ELBO breakdown", "elbo")) is not None:
        rows = [("-ELBO", r.get("neg_elbo")), ("recon -log p(x|z)", r.get("recon")), ("KL", r.get("kl")),
                ("-ELBO bits/dim", r.get("neg_elbo_bits_per_dim")), ("loss (model's weighting)", r.get("loss")),
                ("examples", r.get("n"))]
        lines += ["| term | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None]
        if r.get("kl_per_dim"):
            kl = ", ".join(f"{v:.2f}" for v in r["kl_per_dim"])
            lines += ["", f"KL per latent dim (nats): {kl}"]
        lines.append("")
    if (r := section("Latent code", "latent")) is not None:
        lines += [f"Active units: **{r['active_units']} / {r['latent_dim']}** (Cov_x E[z_u|x] > {r['au_threshold']}); "
                  f"I(x; z) = **{r['mutual_information']:.3f}** nats (aggregate posterior over {r['n']} test "
                  "examples).", ""]
    if (r := section("Importance-sampled NLL", "nll")) is not None:
        lines += [f"-log p(x) ≈ **{r['nll']:.2f} ± {r['nll_stderr']:.2f}** nats "
                  f"(**{r['bits_per_dim']:.4f} ± {r['bits_per_dim_stderr']:.4f}** bits/dim), k = {r['k']}, "
                  f"n = {r['n']} test examples, ± one standard error across examples; "
                  f"{report['timings_s'].get('nll', float('nan')):.0f} s on {r['threads']} thread(s).", ""]
    if (r := section("Reconstructions", "recon")) is not None:
        lines += [f"MSE per pixel **{r['mse']:.5f}** (± {r['mse_stderr']:.5f}), SSIM **{r['ssim']:.4f}** "
                  f"(± {r['ssim_stderr']:.4f}) over {r['n']} test images (torchmetrics SSIM, 11x11 Gaussian "
                  "window).", ""]
    if (r := section("FID (vaekit LeNet features)", "fid")) is not None:
        lines += [f"FID of {r['samples']} samples vs the {r['against']}: **{r['fid']:.2f}**; floor (10,000 train "
                  f"images vs test): {r['fid_floor_train_vs_test']:.2f}. Extractor test accuracy "
                  f"{_fmt(r['extractor_test_accuracy'], 4)}, weights {r['extractor_weights_hash']}. Not comparable "
                  "with Inception FIDs.", ""]
    if (r := section("Disentanglement (MIG)", "mig")) is not None:
        lines += ["| estimator | MIG | factors | per factor | images |", "|---|---|---|---|---|"]
        for est in ("histogram", "sampling"):
            e = r[est]
            per = ", ".join(f"{n} {v:.3f}" for n, v in zip(e["factor_names"], e["per_factor"], strict=True))
            lines.append(f"| {e['description']} | **{e[f'mig_{est}']:.3f}** | {len(e['factor_names'])} | {per} | "
                         f"{e.get('images', e.get('n'))} |")
        lines.append("")
    if (r := section("Images", "images")) is not None:
        titles = {"samples": "Samples (z ~ N(0, I))", "reconstructions": "Test inputs (odd rows) above reconstructions",
                  "interpolations": "Interpolations between posterior means (one pair per row)",
                  "traversals": "Latent traversals"}
        for key, file in r["files"].items():
            note = r["notes"].get(key)
            lines += [f"**{titles.get(key, key)}**" + (f": {note}" if note else ""), "", f"![{key}]({file})", ""]
        for key, note in r["notes"].items():
            if key not in r["files"]:
                lines += [f"{key}: {note}", ""]
    lines += ["## Timings", "", "| part | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["timings_s"].items()] + [""]
    return "\n".join(lines)
