"""dSprites section: VAE, beta-VAE and beta-TCVAE (MSS, MWS) over seeds, both MIG estimators."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common import (
    mean_std,
    print_table,
    train_run,
)

from vaekit.data import load_dataset
from vaekit.evaluation.mig import dsprites_mig
from vaekit.models import TCVAEConfig, VAEConfig
from vaekit.training import DataConfig


def mig_scores(model, args) -> dict[str, float]:
    """MIG with both issue-4 estimators: histogram (on ``--mig-examples`` images) and sampling-based
    (aggregate posterior over ``--mig-sampling`` images), on uniformly drawn dSprites images."""

    res = dsprites_mig(model, n_histogram=args.mig_examples, n_sampling=args.mig_sampling, seed=0)
    return {"mig_histogram": res["histogram"]["mig_histogram"], "mig_sampling": res["sampling"]["mig_sampling"]}


def run(args) -> dict[str, Any]:
    data = load_dataset("dsprites")
    dc = DataConfig(dataset="dsprites", train_subset=args.dsprites_train, test_subset=2000)
    shape = tuple(data.image_shape)
    # Chen et al. use a 1200-1200 MLP; 512-512 takes 0.09 s per step of 256 here (1200-1200: 0.22 s),
    # so the budget buys 2.5x more steps
    arch = {"input_shape": shape, "hidden_sizes": (512, 512), "latent_dim": 10}
    runs = {"vae": VAEConfig(**arch), "beta_vae": VAEConfig(**arch, beta=4.0),
            "tcvae_mss": TCVAEConfig(**arch, beta=6.0, estimator="mss"),
            "tcvae_mws": TCVAEConfig(**arch, beta=6.0, estimator="mws")}
    out: dict[str, Any] = {"budget_s": args.dsprites_budget_s, "train_subset": args.dsprites_train,
                           "seeds": args.seeds, "runs": {}}
    for name, cfg in runs.items():
        per_seed = []
        for seed in range(args.seeds):
            print(f"== dsprites / {name} / seed {seed}: {args.dsprites_budget_s:.0f} s", flush=True)
            model, info = train_run(Path(args.runs) / "dsprites" / f"{name}-s{seed}", cfg, data, dc, args,
                                    seconds=args.dsprites_budget_s, batch_size=256, seed=seed)
            per_seed.append({**info, **mig_scores(model, args)})
            print(per_seed[-1], flush=True)
        summary = {key: mean_std([float(s[key]) for s in per_seed]) for key in per_seed[0]}
        out["runs"][name] = {"per_seed": per_seed, "summary": summary}
    return out


def report(results: dict[str, Any]) -> None:
    """Print the dSprites section's tables."""
    d = results
    rows = []
    for name, r in d["runs"].items():
        s = r["summary"]
        rows.append([name, len(r["per_seed"])] + [f"{s[k]['mean']:.3f} +- {s[k]['std']:.3f}" for k in s
                                                 if k.startswith("mig")])
    keys = [k for k in next(iter(d["runs"].values()))["summary"] if k.startswith("mig")]
    print(f"\ndSprites ({d['train_subset']} training images, {d['budget_s']:.0f} s per run): MIG, mean +- std")
    print_table(["run", "seeds", *keys], rows)


