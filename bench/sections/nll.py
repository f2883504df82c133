"""NLL section: VAE vs IWAE (k = 5) on the same MLP, importance-sampled test NLL, paired."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from common import (
    importance_nll,
    print_table,
    train_run,
)

from sections.mnist import MLP
from vaekit.data import load_dataset
from vaekit.data.dataset import eval_loader
from vaekit.models import VAEConfig
from vaekit.training import DataConfig


def run(args) -> dict[str, Any]:
    data = load_dataset("mnist")
    dc = DataConfig(dataset="mnist", binarize="dynamic")
    x, _ = next(eval_loader(data.test.subset(args.nll_examples), args.nll_examples, "dynamic", 0, "cpu").epoch(0))
    out: dict[str, Any] = {"epochs": args.nll_epochs, "k_eval": args.nll_k, "examples": x.shape[0], "runs": {}}
    per_example = {}
    for name, cfg in (("vae", VAEConfig(**MLP)), ("iwae_k5", VAEConfig(**MLP, objective="iwae", iwae_k=5))):
        print(f"== nll / {name}: {args.nll_epochs} epochs on dynamically binarized MNIST", flush=True)
        model, info = train_run(Path(args.runs) / "nll" / name, cfg, data, dc, args, epochs=args.nll_epochs)
        t0 = time.perf_counter()
        nll_pe = importance_nll(model, x, args.nll_k, seed=0)
        per_example[name] = nll_pe
        out["runs"][name] = {**info, "nll": float(nll_pe.mean()),
                             "nll_stderr": float(nll_pe.std() / math.sqrt(nll_pe.numel())),
                             "eval_s": round(time.perf_counter() - t0, 1)}
        print(out["runs"][name], flush=True)
    diff = per_example["iwae_k5"] - per_example["vae"]
    out["iwae_minus_vae"] = float(diff.mean())
    out["iwae_minus_vae_stderr"] = float(diff.std() / math.sqrt(diff.numel()))
    return out


def report(results: dict[str, Any]) -> None:
    """Print the NLL section's tables."""
    n = results
    rows = [[k, r["steps"], r["train_s"], r["nll"], r["nll_stderr"]] for k, r in n["runs"].items()]
    print(f"\nNLL on {n['examples']} binarized MNIST test images, k = {n['k_eval']}, {n['epochs']} epochs each")
    print_table(["run", "steps", "train s", "NLL (nats)", "stderr"], rows)
    print(f"IWAE - VAE: {n['iwae_minus_vae']:.3f} +- {n['iwae_minus_vae_stderr']:.3f} nats (paired)")
