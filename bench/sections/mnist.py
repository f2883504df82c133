"""MNIST section: each family trained for the same wall-clock budget, common figures plus its own."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    FIGURES,
    fid_tools,
    posterior_means,
    print_table,
    recon_mse,
    sample_images,
    train_run,
)

from sections.aae import aae_figures
from vaekit.data import load_dataset
from vaekit.data.dataset import eval_loader, to_unit_float
from vaekit.evaluation.elbo import evaluate_elbo
from vaekit.evaluation.images import save_grid
from vaekit.evaluation.latent import active_units
from vaekit.models import AAEConfig, CVAEConfig, TCVAEConfig, VAEConfig, VQVAEConfig
from vaekit.models.base import read_model_doc
from vaekit.models.vqvae_prior import train_code_prior
from vaekit.training import DataConfig

MLP = {"hidden_sizes": (400,), "latent_dim": 20}

MNIST_RUNS: dict[str, Any] = {
    "vae": VAEConfig(**MLP),
    "beta_vae": VAEConfig(**MLP, beta=4.0),
    "iwae": VAEConfig(**MLP, objective="iwae", iwae_k=5),
    "tcvae": TCVAEConfig(**MLP, beta=6.0, estimator="mss"),
    # 8-D z and p(z|c): with 20 dims and N(0, I), z also carries the class and samples drift off it
    "cvae": CVAEConfig(hidden_sizes=(400,), latent_dim=8, learned_prior=True, cond_dropout=0.1),
    "cvae_z4": CVAEConfig(hidden_sizes=(400,), latent_dim=4, learned_prior=True, cond_dropout=0.1),
    "vqvae": VQVAEConfig(),
    "vqvae_no_restart": VQVAEConfig(restart_dead_codes=False),
    "aae": AAEConfig(latent_dim=2, prior="mixture", disc_steps=3),
}

def run(args) -> dict[str, Any]:
    data = load_dataset("mnist")
    test = data.test.subset(args.test_subset)
    x, y = to_unit_float(test.images), test.labels
    fid_fn, extractor, fid_note = fid_tools(data)
    if fid_note:
        print(f"note: FID and classifier figures skipped: {fid_note}")
    out: dict[str, Any] = {"budget_s": args.budget_s, "fid_samples": args.fid_samples, "fid_note": fid_note or None,
                           "test_examples": x.shape[0], "runs": {}}
    if fid_fn is not None:
        from vaekit.evaluation.fid import fid_floor

        out["fid_floor_train_vs_test"] = fid_floor("mnist", extractor, data=data)
        out["extractor_test_accuracy"] = getattr(extractor, "test_accuracy", None)
    only = set(args.only.split(",")) if args.only else set(MNIST_RUNS)
    for name, cfg in MNIST_RUNS.items():
        if name not in only:
            continue
        print(f"== mnist / {name}: {args.budget_s:.0f} s of training (or reused)", flush=True)
        model, info = train_run(Path(args.runs) / "mnist" / name, cfg, data, DataConfig(dataset="mnist"), args,
                                seconds=args.budget_s)
        torch.manual_seed(1)
        r: dict[str, Any] = {**info, "family": cfg.family}
        r["recon_mse"] = recon_mse(model, x, y)
        r["test"] = {k: v for k, v in evaluate_elbo(model, eval_loader(test, 1000, "none", 0, "cpu").epoch(0)).items()
                     if k != "kl_per_dim"}
        if cfg.family in ("vae", "tcvae", "cvae", "aae"):
            r["active_units"] = active_units(posterior_means(model, x, y))
        if cfg.family == "vqvae":
            r.update(vq_figures(name, model, data, args, fid_fn))
        if cfg.family == "cvae" and extractor is not None:
            r.update(cvae_figures(name, model, extractor, args))
        if cfg.family == "aae":
            r.update(aae_figures(model, x, y, args, "aae_codes_table_run.png"))
        if fid_fn is not None and "fid" not in r:
            torch.manual_seed(2)
            r["fid"] = fid_fn(sample_images(model, args.fid_samples))
        out["runs"][name] = r
        print(json.dumps({k: v for k, v in r.items() if k != "test"}, default=str)[:600], flush=True)
    return out


def vq_figures(name: str, model, data, args, fid_fn) -> dict[str, Any]:
    """Code usage over the test set; for the restart run also the code prior and its samples' FID."""
    r: dict[str, Any] = {}
    test = data.test.subset(args.test_subset)
    stats = model.code_statistics(eval_loader(test, 1000, "none", 0, "cpu").epoch(0))
    r["test_code_usage"], r["test_perplexity"], r["test_unused_codes"] = (
        stats["code_usage"], stats["perplexity"], stats["unused_codes"])
    log = [json.loads(line) for line in (Path(args.runs) / "mnist" / name / "metrics.jsonl").read_text().splitlines()]
    last = [rec for rec in log if rec.get("type") == "train"][-1]
    r["last_step"] = {k: last[k] for k in ("perplexity", "code_usage", "dead_codes")}
    if name != "vqvae" or args.prior_budget_s <= 0:
        return r
    prior_file = Path(args.runs) / "mnist" / name / "prior.json"
    hist = json.loads(prior_file.read_text()) if prior_file.is_file() else {}
    if not (args.reuse and bool(model.prior_trained) and hist.get("budget_s") == args.prior_budget_s):
        print(f"   training the code prior for {args.prior_budget_s:.0f} s", flush=True)
        torch.manual_seed(0)
        hist = train_code_prior(model, data.train, test=test, epochs=100, time_budget_s=args.prior_budget_s,
                                log=lambda rec: print("  ", rec, flush=True))
        model_dir = Path(args.runs) / "mnist" / name / "model"
        model.save(model_dir, metadata=read_model_doc(model_dir).get("metadata"))
        hist["budget_s"] = args.prior_budget_s
        prior_file.write_text(json.dumps(hist) + "\n")
    r["prior"] = {k: hist[k] for k in ("steps", "seconds", "test_bits_per_index")} | {"test_nll": hist["test_nll"][-1]}
    torch.manual_seed(3)
    t0 = time.perf_counter()
    imgs = sample_images(model, args.fid_samples, batch=500)
    r["prior_sampling_s"] = round(time.perf_counter() - t0, 1)
    save_grid(imgs[:64], FIGURES / "vqvae_prior_samples.png", nrow=8)
    if fid_fn is not None:
        r["fid"] = fid_fn(imgs)
    return r


def cvae_figures(name: str, model, extractor, args) -> dict[str, Any]:
    """Per-class accuracy of conditional samples under the FID extractor's classifier."""
    n = args.cvae_per_class
    acc, grid = [], []
    torch.manual_seed(4)
    for c in range(10):
        imgs = sample_images(model, n, y=c)
        acc.append(float((extractor.predict(imgs) == c).double().mean()))
        grid.append(imgs[:10])
    save_grid(torch.cat(grid), FIGURES / f"{name}_samples_by_class.png", nrow=10)  # one row per class
    return {"conditional_accuracy": sum(acc) / 10, "conditional_accuracy_min": min(acc),
            "conditional_accuracy_per_class": acc, "samples_per_class": n}


def report(results: dict[str, Any]) -> None:
    """Print the MNIST section's tables."""
    m = results
    rows = []
    for name, r in m["runs"].items():
        own = {
            "vae": lambda r: f"KL {r['test'].get('kl', 0):.1f}, AU {r.get('active_units')}",
            "tcvae": lambda r: f"TC {r['test']['tc']:.2f}, MI {r['test']['mi']:.2f}, AU {r.get('active_units')}",
            "cvae": lambda r: (f"cond. acc {r['conditional_accuracy']:.3f} (min class "
                               f"{r['conditional_accuracy_min']:.3f})" if "conditional_accuracy" in r
                               else "cond. acc n/a"),
            "vqvae": lambda r: (f"usage {r['test_code_usage']:.3f}, perplexity {r['test_perplexity']:.0f}, "
                                f"unused {r['test_unused_codes']}"),
            "aae": lambda r: (f"disc acc {r['test']['disc_accuracy']:.2f}, MMD^2 {r['mmd_codes_vs_prior']:.4f} "
                              f"(prior {r['mmd_prior_vs_prior']:.4f}, ring {r['mmd_ring_vs_prior']:.4f}, "
                              f"Gaussian {r['mmd_gaussian_vs_prior']:.4f}), AU {r.get('active_units')}"),
        }[r["family"]](r)
        rows.append([name, r["steps"], r["train_s"], r["recon_mse"], r.get("fid", "n/a"), own])
    print(f"\nMNIST, {m['budget_s']:.0f} s of training per family (1 thread); FID of {m['fid_samples']} samples"
          + (f"; FID floor (train vs test) {m['fid_floor_train_vs_test']:.2f}" if m.get("fid_floor_train_vs_test")
             else ""))
    print_table(["run", "steps", "train s", "recon MSE", "FID", "family figures"], rows)
