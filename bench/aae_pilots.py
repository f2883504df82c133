"""AAE pilots: one 2-D mixture-prior AAE variant trained for a time budget with the families
benchmark's protocol (5,000 training images held out, the weights whose held-out codes are
closest to the prior by MMD^2 kept), then its test MMD^2 to the prior, selected and last weights.

Variants (``--variant``): ``det`` (the families recipe: deterministic encoder, 3 discriminator
steps), ``gauss`` (Gaussian encoder), ``d5`` (5 discriminator steps), ``gen5e-5``/``gen2e-5``/
``gen5e-4``/``gen1e-3`` (generator-phase rate), ``r1``/``r10``/``r100`` (R1 penalty), ``lg``
(label-guided), ``lgr10`` (label-guided + R1 10). Writes bench/results/aae_pilots.json (one
entry per variant, seed and batch, accumulated across invocations).

    python bench/aae_pilots.py --variant r10 --seconds 600 [--seed 0] [--batch 128]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, print_table, train_run, write_results  # noqa: E402
from sections import aae as A  # noqa: E402

from vaekit.data import load_dataset  # noqa: E402
from vaekit.data.dataset import to_unit_float  # noqa: E402
from vaekit.models import AAEConfig  # noqa: E402
from vaekit.training.config import DataConfig  # noqa: E402

BASE = {"latent_dim": 2, "prior": "mixture", "disc_steps": 3}
VARIANTS = {
    "det": {}, "gauss": {"encoder": "gaussian"}, "d5": {"disc_steps": 5},
    "gen5e-5": {"gen_lr": 5e-5}, "gen2e-5": {"gen_lr": 2e-5}, "gen5e-4": {"gen_lr": 5e-4}, "gen1e-3": {"gen_lr": 1e-3},
    "r1": {"disc_r1": 1.0}, "r10": {"disc_r1": 10.0}, "r100": {"disc_r1": 100.0},
    "lg": {"label_guided": True}, "lgr10": {"label_guided": True, "disc_r1": 10.0},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", choices=sorted(VARIANTS), default="det")
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--mmd-points", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default="runs/bench-aae-pilots")
    args = p.parse_args()
    args.reuse = False
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist")
    cfg = AAEConfig(**BASE, **VARIANTS[args.variant])
    key = f"{args.variant}-s{args.seed}-b{args.batch}"
    run_dir = Path(args.runs) / key
    model, info = train_run(run_dir, cfg, data, DataConfig(dataset="mnist", validation=A.AAE_VALIDATION), args,
                              seconds=args.seconds, batch_size=args.batch, seed=args.seed, select=A.AAE_SELECT)
    x, y = to_unit_float(data.test.images), data.test.labels
    figs = A.aae_figures(model.eval(), x, y, args, f"aae_pilot_{key}.png")
    last = A.last_weights_figures(run_dir, cfg, x, y, args, f"aae_pilot_{key}_last.png")
    entry = {"variant": args.variant, "config": VARIANTS[args.variant], "seed": args.seed, "batch": args.batch,
             "seconds": args.seconds, **info,
             **{k: v for k, v in figs.items() if k.startswith(("mmd_codes", "mode", "within", "class", "scatter"))},
             "last": last}
    path = RESULTS / "aae_pilots.json"
    runs = json.loads(path.read_text()).get("runs", {}) if path.is_file() else {}
    runs[key] = entry
    write_results("aae_pilots", {"protocol": {"validation": A.AAE_VALIDATION, "select": str(A.AAE_SELECT)},
                                 "runs": runs})
    checks = [v for _, v in info["selected"]["checks"]]
    print_table(["run", "steps", "selected step", "test MMD^2 selected", "test MMD^2 last", "held-out min", "max"],
                [[key, info["steps"], info["selected"]["best_step"], figs["mmd_codes_vs_prior"],
                  last["mmd_codes_vs_prior"] if last else "-", min(checks), max(checks)]])


if __name__ == "__main__":
    main()
