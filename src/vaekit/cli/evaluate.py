"""``vaekit evaluate RUN_OR_MODEL``: test-split ELBO with its recon and KL terms."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from vaekit.cli.common import data_for, open_model, print_table, write_json
from vaekit.data.dataset import eval_loader
from vaekit.evaluation.elbo import evaluate_elbo


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a trained model on the test split")
    p.add_argument("model", help="run folder or model folder")
    p.add_argument("--dataset", help="dataset to evaluate on (default: the one it was trained on)")
    p.add_argument("--data-dir", help="directory holding the dataset files")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior samples")
    p.add_argument("-o", "--out", help="JSON file to write (default: RUN/eval.json for a run folder)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, meta, run_dir = open_model(args.model, device)
    ds, data_cfg = data_for(meta, args.dataset, args.data_dir)
    loader = eval_loader(ds.test, args.batch_size, data_cfg.get("binarize", "none"),
                         data_cfg.get("binarize_seed", 0), device)
    res = evaluate_elbo(model, loader.epoch(0), seed=args.seed)
    D = len(res.get("kl_per_dim", []))
    rows = [("examples", res["n"]), ("loss (model's beta)", res["loss"]), ("recon  -log p(x|z)", res["recon"])]
    if "kl" in res:
        rows += [("kl", res["kl"]), ("-ELBO", res["neg_elbo"]),
                 ("-ELBO bits/dim", res["neg_elbo"] / (math.log(2) * math.prod(model.input_shape)))]
        rows += [("latent dims", D), ("dims with KL > 0.01", sum(k > 0.01 for k in res["kl_per_dim"]))]
    shown = {"n", "loss", "recon", "kl", "neg_elbo", "kl_per_dim"}
    rows += [(k, v) for k, v in res.items() if k not in shown and isinstance(v, float)]  # the family's own terms
    print_table(rows, f"{ds.name} test split, binarize={data_cfg.get('binarize', 'none')} (nats per example)")
    out = Path(args.out) if args.out else (run_dir / "eval.json" if run_dir else None)
    if out:
        write_json(out, {"dataset": ds.name, "split": "test", "binarize": data_cfg.get("binarize", "none"),
                         "model": str(args.model), "metrics": res})
        print(f"wrote {out}")
    return 0
