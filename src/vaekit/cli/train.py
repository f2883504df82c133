"""``vaekit train [CONFIG] --set key=value ...``: train a model into a run folder."""

from __future__ import annotations

import argparse

import yaml

from vaekit.training.config import load_run_config
from vaekit.training.distributed import DistInfo
from vaekit.training.run import prepare


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (resumes a run folder that has checkpoints)")
    p.add_argument("config", nargs="?", help="YAML or JSON run config (sections data, model, train)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 --set model.latent_dim=32")
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh even if the run has checkpoints (the earlier run is moved to RUN/previous/N)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, make every check a real run makes (data, model, device, "
                        "run folder), and exit without writing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    config = load_run_config(args.config, args.overrides)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        print("# resolved config")
        print(yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip())
        print(f"# run folder: {config.run_dir}")
    trainer = prepare(config)  # loads the data and builds the model: the checks a real run makes first
    if args.dry_run:
        trainer.check(resume=not args.no_resume)
        if is_main:
            print("# dry run: every check passed; nothing was written")
        return 0
    result = trainer.fit(resume=not args.no_resume)
    if is_main and DistInfo().is_main:
        print(f"trained {result.steps} steps in {result.wall_time_s:.1f} s"
              + (f" (resumed from {result.resumed_from})" if result.resumed_from else ""))
        if result.selected:
            sel = result.selected
            print(f"selected: the weights of step {sel['best_step']} (best validation {sel['metric']} "
                  f"{sel['best_value']:.4g} of {len(sel['checks'])} checks; the last step scored "
                  f"{sel['checks'][-1][1]:.4g})")
        if result.final_eval:
            ev = result.final_eval
            terms = "  ".join(f"{k} {v:.3f}" for k, v in ev.items() if isinstance(v, float) and k != "neg_elbo")
            print(f"test: {terms} (loss terms in nats per example, n={ev['n']})")
        print(f"model: {result.model_dir}")
    return 0
