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
* ``ood``: AUROC, AUPR and FPR at 95% TPR of every anomaly score against ``ood_data``
  (:mod:`vaekit.anomaly.report_part`), with score histograms.

Each part is an object (:mod:`vaekit.evaluation.parts`) that says when it applies, runs, renders
its Markdown and summarises itself. A part that does not apply to a model or dataset is recorded
as skipped, with the reason, in both files; nothing is silently left out. Every part records its
wall time.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vaekit.atomic import atomic_write_bytes
from vaekit.data.dataset import ImageDataset, eval_loader
from vaekit.errors import ConfigError, InputError, describe
from vaekit.evaluation.parts import PARTS, ReportPart, SkippedError

METRICS = tuple(PARTS)  # in run order
DEFAULT_METRICS = ("elbo", "latent", "recon", "images")


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
    ood_data: str | None = None  # ood part: "mnist", "fashion-mnist" or "corrupted" (None: the part is skipped)
    ood_examples: int = 4000  # ood part: first N test images (half fit the scores, half are scored)

    def __post_init__(self) -> None:
        metrics = tuple(self.metrics)
        if metrics == ("all",):
            metrics = METRICS
        bad = [m for m in metrics if m not in METRICS]
        if bad or not metrics:
            raise ConfigError(f"metrics must be a non-empty list drawn from {list(METRICS)} (or 'all'), "
                              f"got {metrics!r}")
        self.metrics = metrics
        if self.ood_data is not None and self.ood_data not in ("mnist", "fashion-mnist", "corrupted"):
            raise ConfigError(f"ood_data must be mnist, fashion-mnist, corrupted or None, "
                              f"got {describe(self.ood_data)}")
        for name in ("k", "max_samples", "fid_samples", "mig_histogram_images", "batch_size", "traversal_dims",
                     "ood_examples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {describe(v)}")
        for name in ("nll_examples", "recon_examples", "mig_sampling_images", "test_examples"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {describe(v)}")
        if self.fid_samples < 2:
            raise ConfigError(f"fid_samples must be >= 2, got {self.fid_samples}")


@dataclass
class EvalContext:
    """What a report part sees: the model, the data, the settings, the output folder and earlier results."""

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
    ctx = EvalContext(model, dataset, binarize, config, out, {})
    timings: dict[str, float] = {}
    for part in (m for m in METRICS if m in config.metrics):  # elbo before images (traversals use its KL)
        t0 = time.perf_counter()
        ctx.results[part] = run_part(PARTS[part], ctx)
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


def run_part(part: ReportPart, ctx: EvalContext) -> dict[str, Any]:
    """The part's result, or ``{"skipped": reason}`` when it does not apply."""
    why = part.applies(ctx)
    if why is not None:
        return {"skipped": why}
    try:
        return part.run(ctx)
    except SkippedError as exc:  # found out while running (e.g. no FID extractor on disk)
        return {"skipped": str(exc)}


def summary_rows(report: dict[str, Any]) -> list[tuple[str, Any]]:
    """Terminal rows for a report: skipped parts with their reason, then each part's own summary."""
    m = report["metrics"]
    rows: list[tuple[str, Any]] = [(n, f"skipped: {r['skipped']}") for n, r in m.items() if "skipped" in r]
    for name, r in m.items():
        if "skipped" not in r and name in PARTS:
            rows += PARTS[name].summary(r)
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    """A readable report: one section per part, numbers with their units, images embedded."""
    lines = [f"# Evaluation of {report['model']} on {report['dataset']}", "",
             f"Test split, binarize={report['binarize']}, seed {report['config']['seed']}; "
             f"torch {report['machine']['torch']}, {report['machine']['threads']} thread(s), "
             f"{report['machine']['device']}. Log-likelihoods in nats per example.", ""]
    for name, r in report["metrics"].items():
        part = PARTS[name]
        lines += [f"## {part.title}", ""]
        lines += [f"Skipped: {r['skipped']}", ""] if "skipped" in r else part.render(r, report)
    lines += ["## Timings", "", "| part | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["timings_s"].items()] + [""]
    return "\n".join(lines)
