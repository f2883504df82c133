"""Model quality against published numbers: train each recipe, evaluate it with the evaluation suite.

Recipes (configs/):

* ``burda``: Burda et al. (2015), one stochastic layer, 784-200-200-50 tanh, Bernoulli, dynamically
  binarized MNIST. Published: NLL 86.76 nats (k = 5000) after 3,280 passes; ours is trained for the
  budget in configs/burda_mlp.yaml.
* ``pixel``: a convolutional VAE with a local autoregressive decoder head (vaekit.models.pixel_vae),
  trained within 45 minutes on the 2-core machine; target: below 86.76 nats.
* ``dsprites``: beta-VAE (beta = 4) on dSprites, both MIG estimators.

For each recipe: train time (wall clock of `vaekit train`, this machine), test -ELBO, NLL with
k = 5000 on the full test split (nats, ± standard error across test examples), active units, I(x; z),
FID of 10,000 samples (MNIST recipes; vaekit LeNet extractor), MIG (dSprites, both estimators).

    python bench/quality.py                       # every recipe: train (or resume) and evaluate
    python bench/quality.py --recipes burda       # one recipe
    python bench/quality.py --table-only          # rebuild the table from the saved reports

Runs go to runs/quality/<recipe>/ (a finished run is not retrained: delete it to start afresh);
each recipe's evaluation report is runs/quality/<recipe>/report/; the table is written to
bench/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from vaekit.data import load_dataset  # noqa: E402
from vaekit.evaluation.parts import PARTS  # noqa: E402
from vaekit.evaluation.report import EvalConfig, evaluate_model  # noqa: E402
from vaekit.models import load_model  # noqa: E402
from vaekit.training import load_run_config, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "burda": {"config": "configs/burda_mlp.yaml", "metrics": ("elbo", "latent", "nll", "recon", "fid", "images"),
              "published": "Burda et al. 2015, VAE 1 layer: NLL 86.76 after 3,280 passes"},
    "pixel": {"config": "configs/pixel_vae_mnist.yaml", "metrics": ("elbo", "latent", "nll", "recon", "fid", "images"),
              "published": "target: NLL < 86.76 within 45 min of training here"},
    "dsprites": {"config": "configs/beta_vae_dsprites.yaml", "metrics": ("elbo", "latent", "recon", "mig", "images"),
                 "published": "beta-VAE (Higgins et al. 2017), beta = 4"},
}


def run_recipe(name: str, args: argparse.Namespace) -> dict:
    spec = RECIPES[name]
    overrides = [f"out_dir={args.out}", f"name={name}"]
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    cfg = load_run_config(ROOT / spec["config"], overrides + list(args.set or []))
    run_dir = cfg.run_dir
    timing_file = run_dir / "train_time.json"
    data = load_dataset(cfg.data.dataset)
    if not (run_dir / "model" / "config.json").is_file():
        print(f"[{name}] training {spec['config']} into {run_dir}", flush=True)
        result = train(cfg, dataset=data)
        prev = json.loads(timing_file.read_text()) if timing_file.is_file() else {"train_time_s": 0.0}
        timing = {"train_time_s": prev["train_time_s"] + result.wall_time_s, "steps": result.steps,
                  "epochs": result.epochs_completed, "threads": cfg.train.threads or torch.get_num_threads(),
                  "resumed": result.resumed_from is not None}
        timing_file.write_text(json.dumps(timing, indent=2) + "\n")
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    report_file = run_dir / "report" / "report.json"
    if args.train_only:
        return {}
    if args.reevaluate or not report_file.is_file():
        if args.threads:
            torch.set_num_threads(args.threads)
        model = load_model(run_dir / "model")
        ec = EvalConfig(metrics=spec["metrics"], k=args.k, nll_examples=args.nll_examples, seed=0,
                        mig_sampling_images=args.mig_images or None)
        print(f"[{name}] evaluating: {', '.join(ec.metrics)}", flush=True)
        evaluate_model(model, data, run_dir / "report", ec, binarize=cfg.data.binarize, name=name, progress=True)
    report = json.loads(report_file.read_text())
    return {"recipe": name, "config": spec["config"], "published": spec["published"], **timing, "report": report}


SHOWN_PARTS = ("elbo", "nll", "latent", "fid", "mig")  # one column each, as the part summarises itself


def row(entry: dict) -> list:
    m = entry["report"]["metrics"]

    def cell(name: str) -> str:
        r = m.get(name)
        if r is None:
            return "-"
        if "skipped" in r:
            return "skipped"
        return "; ".join(f"{label} {value:.3f}" if isinstance(value, float) else f"{label} {value}"
                         for label, value in PARTS[name].summary(r))

    train_min = entry.get("train_time_s", float("nan")) / 60
    nll_s = entry["report"]["timings_s"].get("nll")
    timing = f"{train_min:.1f} min, {entry.get('epochs', '?')} ep, {entry.get('threads', '?')} thr"
    return [entry["recipe"], timing + (f"; NLL {nll_s:.0f} s" if nll_s else ""), *map(cell, SHOWN_PARTS)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="burda,pixel,dsprites", help="comma-separated, from " + ",".join(RECIPES))
    p.add_argument("--out", default=str(ROOT / "runs" / "quality"), help="parent folder of the runs")
    p.add_argument("--threads", type=int, default=2, help="torch threads for training and evaluation")
    p.add_argument("-k", type=int, default=5000, help="importance samples for the NLL")
    p.add_argument("--nll-examples", type=int, help="first N test examples for the NLL (default: all 10,000)")
    p.add_argument("--mig-images", type=int, default=100_000, help="dSprites images for the sampling MIG (0: all)")
    p.add_argument("--set", action="append", help="extra config override for every recipe trained")
    p.add_argument("--reevaluate", action="store_true", help="re-run the evaluation of finished runs")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from saved reports")
    p.add_argument("--train-only", action="store_true", help="train (or skip finished runs), do not evaluate")
    args = p.parse_args()
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    bad = [n for n in names if n not in RECIPES]
    if bad:
        p.error(f"unknown recipe(s) {bad}; choose from {list(RECIPES)}")
    entries = []
    t0 = time.perf_counter()
    for name in names:
        report = Path(args.out) / name / "report" / "report.json"
        if args.table_only:
            if not report.is_file():
                print(f"[{name}] no report at {report}; skipped")
                continue
            timing_file = Path(args.out) / name / "train_time.json"
            timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
            entries.append({"recipe": name, "config": RECIPES[name]["config"], "published": RECIPES[name]["published"],
                            **timing, "report": json.loads(report.read_text())})
        elif args.train_only:
            run_recipe(name, args)
        else:
            entries.append(run_recipe(name, args))
    if args.train_only:
        return 0
    headers = ["recipe", "training", *(PARTS[n].title for n in SHOWN_PARTS)]
    print_table(headers, [row(e) for e in entries])
    for e in entries:
        print(f"  {e['recipe']}: {e['published']}")
    prev = {}
    path = Path(__file__).resolve().parent / "results" / "quality.json"
    if path.is_file():  # keep recipes measured in earlier invocations
        prev = {e["recipe"]: e for e in json.loads(path.read_text()).get("recipes", [])}
    prev.update({e["recipe"]: e for e in entries})
    write_results("quality", {"recipes": list(prev.values()), "wall_time_s": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
