"""Shared helpers for benchmarks: a printed table and a JSON file under bench/results/."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing
from vaekit.errors import VaekitError  # noqa: E402
from vaekit.evaluation.nll import nll  # noqa: E402
from vaekit.models import build_model, load_model  # noqa: E402
from vaekit.training import Callback, DataConfig, TrainConfig, Trainer  # noqa: E402
from vaekit.training.monitors import MonitorConfig  # noqa: E402
from vaekit.training.selection import SelectConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "commit": commit,
    }


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def write_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **data}, indent=2) + "\n")
    print(f"wrote {path}")
    return path

# -- training and evaluation helpers shared by the benchmarks ---------------------------------------
FIGURES = RESULTS / "families"


class TimeBudget(Callback):
    """Stop training once ``seconds`` of wall time have passed since the first step."""

    name = "time_budget"

    def __init__(self, seconds: float):
        self.seconds, self.t0 = seconds, None

    def on_fit_start(self, trainer) -> None:
        self.t0 = time.perf_counter()

    def on_step_end(self, trainer, record) -> None:
        if time.perf_counter() - self.t0 > self.seconds and not trainer._stop_reason:
            trainer.request_stop(f"time budget of {self.seconds:.0f} s")


def train_run(run_dir: Path, cfg: Any, data, data_cfg: DataConfig, args, *, seconds: float | None = None,
              epochs: int = 1000, batch_size: int = 128, seed: int = 0, select: SelectConfig | None = None):
    """Train (or, with --reuse, load) one model; returns (model, info). With ``select`` the model
    returned (and saved) holds the weights selected on ``data_cfg.validation`` held-out images."""
    model_dir = run_dir / "model"
    info_file = run_dir / "bench_run.json"
    if args.reuse and model_dir.is_dir() and info_file.is_file():
        try:
            model = load_model(model_dir)
        except VaekitError as exc:  # written by an older version of the family: retrain
            print(f"   not reusing {model_dir}: {exc}"[:200], flush=True)
        else:
            if model.config == cfg:  # a changed config is retrained
                return model, json.loads(info_file.read_text())
    torch.manual_seed(seed)
    model = build_model(cfg)
    tc = TrainConfig(epochs=epochs, batch_size=batch_size, lr=1e-3, seed=seed, threads=args.threads,
                     checkpoint_every=0, eval_every=0, progress=False, tensorboard="off", keep_checkpoints=1)
    callbacks = [TimeBudget(seconds)] if seconds else []
    t0 = time.perf_counter()
    result = Trainer(model, data, tc, data_config=data_cfg, run_dir=run_dir, callbacks=callbacks,
                     monitor=MonitorConfig(enabled=False), select=select).fit(resume=False)
    n_train = len(data_cfg.train_splits(data.train)[0])
    info: dict[str, Any] = {"steps": result.steps, "train_s": round(time.perf_counter() - t0, 1),
                            "epochs": round(result.steps / math.ceil(n_train / batch_size), 2)}
    if result.selected:
        info["selected"] = result.selected
    info_file.write_text(json.dumps(info) + "\n")
    return model.eval(), info


def fid_tools(data):
    """(fid(images) -> float, classifier, "") on the vaekit MNIST extractor, or (None, None, why) without one."""
    from vaekit.evaluation.extractor import load_extractor
    from vaekit.evaluation.fid import fid

    try:
        extractor = load_extractor("mnist")
    except VaekitError as exc:  # no extractor trained yet: reported, not hidden
        return None, None, f"no FID extractor: {exc}"
    return (lambda images: fid(images, "mnist", extractor, data=data)), extractor, ""


@torch.no_grad()
def sample_images(model, n: int, batch: int = 1000, **kw) -> torch.Tensor:
    out = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "the VQ-VAE's code prior has not been trained")
        for i in range(0, n, batch):
            out.append(model.sample(min(batch, n - i), **kw).clamp(0, 1))
    return torch.cat(out)


@torch.no_grad()
def recon_mse(model, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Mean squared error per pixel between test images and reconstructions (grey levels)."""
    total = 0.0
    for i in range(0, x.shape[0], batch):
        xb = x[i : i + batch]
        total += float((model.reconstruct(xb, y[i : i + batch]) - xb).pow(2).sum())
    return total / x.numel()


@torch.no_grad()
def posterior_means(model, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    out = []
    for i in range(0, x.shape[0], batch):
        xb = x[i : i + batch]
        q = model.encode(xb, y[i : i + batch])
        out.append(q.mean)
    return torch.cat(out)


def importance_nll(model, x: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Per-example importance-sampled -log p(x), (N,) float64 (vaekit's ``nll``)."""
    res = nll(model, [(x, None)], k=k, seed=seed, per_example=True)
    return -torch.tensor(res["log_px"], dtype=torch.float64)


def mean_std(values: list[float]) -> dict[str, float]:
    v = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(v.mean()), "std": float(v.std()) if len(v) > 1 else 0.0, "n": len(values)}
