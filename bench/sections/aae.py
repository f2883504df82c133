"""AAE section: the 2-D mixture-prior AAE over several seeds with held-out MMD model selection."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from common import (
    FIGURES,
    RESULTS,
    mean_std,
    print_table,
    recon_mse,
    train_run,
)

from vaekit.data import load_dataset
from vaekit.data.dataset import eval_loader, to_unit_float
from vaekit.evaluation.elbo import evaluate_elbo
from vaekit.models import AAEConfig, build_model
from vaekit.objectives.mmd import median_bandwidth, mmd_rbf
from vaekit.training import DataConfig
from vaekit.training.checkpoint import latest_checkpoint
from vaekit.training.selection import SelectConfig

AAE_LONG = AAEConfig(latent_dim=2, prior="mixture", disc_steps=3)
AAE_LABEL = AAEConfig(latent_dim=2, prior="mixture", disc_steps=3, label_guided=True)  # Makhzani et al. Sec. 3
# the kernel of every AAE MMD figure: widths from a quarter of one mixture component's std (0.5)
# up to the circle's radius (4), so both the modes and the ring are resolved
AAE_KERNEL = (0.25, 0.5, 1.0, 2.0, 4.0)
# model selection for the AAE runs: 5,000 uniformly drawn training images held out, MMD^2 of
# their codes to the prior every 250 steps with the kernel above, the best weights kept
AAE_VALIDATION = 5000
AAE_SELECT = SelectConfig(metric="prior_mmd", every_steps=250, samples=2000, bandwidths=AAE_KERNEL)


def aae_figures(model, x: torch.Tensor, y: torch.Tensor, args, png_name: str = "aae_codes.png") -> dict[str, Any]:
    """MMD between encoded test points and prior samples, reference MMDs, and the code scatter plot."""
    with torch.no_grad():  # the aggregate posterior: one draw z ~ q(z|x) per test image (the mean if deterministic)
        torch.manual_seed(6)
        codes = torch.cat([model.encode(x[i : i + 1000]).rsample() for i in range(0, x.shape[0], 1000)])
    n = min(args.mmd_points, codes.shape[0])
    # a uniform subsample: the MNIST test split is ordered by writer population (the first 5,000
    # images come from a different group than the last 5,000), so its first n codes are biased
    pick = torch.randperm(codes.shape[0], generator=torch.Generator().manual_seed(7))[:n]
    g = torch.Generator().manual_seed(5)
    prior = model.sample_prior(n, g)
    prior2 = model.sample_prior(n, g)
    # reference distributions: one Gaussian with the prior's spread, and a ring of the prior's
    # radius and radial spread without its 10 modes (what "on the circle, modes not found" scores)
    c = model.config
    gauss = torch.randn(n, codes.shape[1], generator=g) * prior.std(0)
    angle = 2 * math.pi * torch.rand(n, generator=g)
    radius = c.mixture_radius + c.mixture_std * torch.randn(n, generator=g)
    ring = torch.zeros(n, codes.shape[1])
    ring[:, 0], ring[:, 1] = radius * torch.cos(angle), radius * torch.sin(angle)
    ring[:, 2:] = c.mixture_std * torch.randn(n, codes.shape[1] - 2, generator=g)
    # near misses, to calibrate "close": the prior's mixture with components twice as wide, and
    # with half the components twice as likely as the others (weights 2:1)
    means = model.mixture_means.cpu()
    k = means.shape[0]
    wide = means[torch.randint(0, k, (n,), generator=g)]
    wide = wide + 2 * c.mixture_std * torch.randn(n, means.shape[1], generator=g)
    w = torch.ones(k)
    w[: k // 2] = 2.0
    uneven = means[torch.multinomial(w, n, replacement=True, generator=g)]
    uneven = uneven + c.mixture_std * torch.randn(n, means.shape[1], generator=g)
    r: dict[str, Any] = {"mmd_points": n}
    bw = median_bandwidth(codes[pick], prior)
    # two kernels: widths at the scale of one mixture component and up (resolve the modes), and the
    # median heuristic (the usual default, blind to structure finer than the ring)
    for tag, bws in (("", AAE_KERNEL), ("_median", (0.5 * bw, bw, 2 * bw))):
        r[f"mmd{tag}_bandwidths"] = list(bws)
        for ref, pts in (("codes", codes[pick]), ("prior", prior2), ("wide_modes", wide), ("uneven_weights", uneven),
                         ("ring", ring), ("gaussian", gauss)):
            r[f"mmd{tag}_{ref}_vs_prior"] = mmd_rbf(pts, prior, bws)
    r.update(mode_figures(codes, y, means, c.mixture_std))
    for ref, pts in (("prior", prior2), ("ring", ring), ("wide_modes", wide), ("uneven_weights", uneven)):
        ref_modes = mode_figures(pts, y[: pts.shape[0]], means, c.mixture_std)
        r[f"within_1std_{ref}"], r[f"within_3std_{ref}"] = ref_modes["within_1std"], ref_modes["within_3std"]
        r[f"mode_mass_tv_{ref}"] = ref_modes["mode_mass_tv"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 6), dpi=120)
        pts = ax.scatter(codes[:, 0], codes[:, 1], c=y, cmap="tab10", s=2, alpha=0.6)
        means = model.mixture_means.cpu()
        ax.scatter(means[:, 0], means[:, 1], marker="x", c="black", s=60, label="prior component means")
        ax.legend(loc="upper right")
        fig.colorbar(pts, ax=ax, label="digit class")
        ax.set_title(f"AAE: 2-D codes of {codes.shape[0]} MNIST test images\n"
                     f"MMD^2 to the prior {r['mmd_codes_vs_prior']:.4f} (ring without modes "
                     f"{r['mmd_ring_vs_prior']:.4f}, prior itself {r['mmd_prior_vs_prior']:.4f})", fontsize=9)
        ax.set_aspect("equal")
        FIGURES.mkdir(parents=True, exist_ok=True)
        png = FIGURES / png_name
        fig.savefig(png, bbox_inches="tight")
        plt.close(fig)
        r["scatter_png"] = str(png.relative_to(RESULTS.parent.parent) if png.is_relative_to(RESULTS.parent.parent)
                               else png)
    except ImportError as exc:
        r["scatter_png"] = f"not drawn: {exc}"
    return r


def mode_figures(codes: torch.Tensor, y: torch.Tensor, means: torch.Tensor, std: float) -> dict[str, Any]:
    """How the codes (N, D) fill the mixture's modes: the share of codes nearest each component
    mean (sorted, largest first; the prior gives 0.1 each), the shares within 1 and 3 std of their
    nearest mean (the prior, in 2-D: 1 - exp(-1/2) = 0.393 and 1 - exp(-9/2) = 0.989; within 1 std
    tells modes from a ring, within 3 std does not), and how often a class's codes share the
    component most of that class lands in (class purity of the modes)."""
    d = torch.cdist(codes.double(), means.double())
    dist, nearest = d.min(1)
    mass = torch.bincount(nearest, minlength=means.shape[0]).double() / codes.shape[0]
    per_class = [float((nearest[y == k] == nearest[y == k].mode().values).double().mean())
                 for k in range(int(y.max()) + 1) if (y == k).any()]
    return {"mode_mass": sorted(mass.tolist(), reverse=True),
            "mode_mass_tv": 0.5 * float((mass - 1.0 / means.shape[0]).abs().sum()),  # vs equal weights; 2:1 gives 1/6
            "within_1std": float((dist < std).double().mean()),
            "within_3std": float((dist < 3 * std).double().mean()),
            "class_mode_purity": sum(per_class) / len(per_class)}


def last_weights_figures(run_dir: Path, cfg: Any, x: torch.Tensor, y: torch.Tensor, args,
                         png_name: str) -> dict[str, Any] | None:
    """The AAE figures of a run's last weights (its newest checkpoint: before model selection put
    the best ones back), with their step; None when the run kept no checkpoint."""
    found = latest_checkpoint(run_dir / "checkpoints")
    if found is None:
        return None
    last = build_model(cfg)
    last.load_state_dict(found[0]["model"])
    lf = aae_figures(last.eval(), x, y, args, png_name)
    keys = ("mmd_codes_vs_prior", "within_1std", "within_3std", "mode_mass", "mode_mass_tv", "class_mode_purity",
            "scatter_png")
    return {"step": found[0]["step"], **{k: lf[k] for k in keys}}


def aae_runs(args) -> list[tuple[str, Any, int]]:
    """(name, config, seed) of the AAE section's runs: ``s<seed>`` (unsupervised) and ``label_guided``."""
    runs = [(f"s{seed}", AAE_LONG, seed) for seed in range(args.aae_seeds)] + [("label_guided", AAE_LABEL, 0)]
    if args.aae_only:
        wanted = args.aae_only.split(",")
        unknown = sorted(set(wanted) - {n for n, _, _ in runs})
        if unknown:
            raise SystemExit(f"--aae-only: unknown run(s) {unknown}; valid: {[n for n, _, _ in runs]}")
        runs = [r for r in runs if r[0] in wanted]
    return runs


def run(args) -> dict[str, Any]:
    """The 2-D mixture-prior AAE, ``--aae-seeds`` unsupervised seeds and one label-guided run, each
    trained for ``--aae-budget-s`` with 5,000 training images held out for model selection (the
    weights whose held-out codes are closest to the prior by MMD^2, checked every 250 steps).
    Per run: test MMD^2 of the selected weights and of the last weights, mode figures, references
    and a scatter plot; ``summary``: mean +- std over the unsupervised seeds."""
    data = load_dataset("mnist")
    x, y = to_unit_float(data.test.images), data.test.labels
    dc = DataConfig(dataset="mnist", validation=AAE_VALIDATION)
    out: dict[str, Any] = {"budget_s": args.aae_budget_s, "validation": AAE_VALIDATION,
                           "select": {"metric": AAE_SELECT.metric, "every_steps": AAE_SELECT.every_steps,
                                      "samples": AAE_SELECT.samples, "bandwidths": list(AAE_KERNEL)},
                           "runs": {}}
    for name, cfg, seed in aae_runs(args):
        print(f"== aae / {name}: training for {args.aae_budget_s:.0f} s (or reused)", flush=True)
        run_dir = Path(args.runs) / "aae" / name
        model, info = train_run(run_dir, cfg, data, dc, args, seconds=args.aae_budget_s, seed=seed, select=AAE_SELECT)
        loader = eval_loader(data.test, 1000, "none", 0, "cpu").epoch(0)
        r = {**info, "seed": seed, "recon_mse": recon_mse(model, x, y),
             "test": {k: v for k, v in evaluate_elbo(model, loader).items() if k != "kl_per_dim"},
             **aae_figures(model, x, y, args, f"aae_codes_{name}.png")}
        last = last_weights_figures(run_dir, cfg, x, y, args, f"aae_codes_{name}_last.png")
        if last is not None:
            r["last"] = last
        print(json.dumps({k: v for k, v in r.items() if k != "selected"}, default=str)[:600], flush=True)
        out["runs"][name] = r
    seeds = [r for n, r in out["runs"].items() if n.startswith("s")]
    if seeds:
        out["summary"] = {"selected_mmd": mean_std([r["mmd_codes_vs_prior"] for r in seeds]),
                          "last_mmd": mean_std([r["last"]["mmd_codes_vs_prior"] for r in seeds if "last" in r]),
                          "selected_within_1std": mean_std([r["within_1std"] for r in seeds]),
                          "last_within_1std": mean_std([r["last"]["within_1std"] for r in seeds if "last" in r]),
                          "selected_within_3std": mean_std([r["within_3std"] for r in seeds]),
                          "selected_mode_mass_tv": mean_std([r["mode_mass_tv"] for r in seeds]),
                          "references": {k: seeds[0][k] for k in seeds[0] if "codes" not in k and (
                              (k.startswith("mmd_") and "_vs_prior" in k) or (k.startswith(("within_", "mode_mass_tv_"))
                              and k.count("_") >= 2 and k.split("_")[-1] in ("prior", "ring", "modes", "weights")))}}
    return out


def report(results: dict[str, Any]) -> None:
    """Print the AAE section's tables."""
    a = results
    rows = [[name, r["steps"], r["selected"]["best_step"] if "selected" in r else "-", r["mmd_codes_vs_prior"],
             r["last"]["mmd_codes_vs_prior"] if "last" in r else "-", r["within_1std"],
             r["last"]["within_1std"] if "last" in r else "-", r["within_3std"],
             f"{min(r['mode_mass']):.3f}-{max(r['mode_mass']):.3f}", r["scatter_png"]]
            for name, r in a["runs"].items()]
    print(f"\nAAE, 2-D code, 10-component mixture prior, {a['budget_s']:.0f} s per run; test MMD^2 to prior "
          f"samples, kernel widths {a['select']['bandwidths']}; selected on {a['validation']} held-out "
          f"training images every {a['select']['every_steps']} steps")
    print_table(["run", "steps", "selected step", "MMD^2 selected", "MMD^2 last", "within 1 std selected",
                 "within 1 std last", "within 3 std selected", "mode mass", "scatter"], rows)
    if "summary" in a:
        sm = a["summary"]
        ms = lambda d, f: f"{d['mean']:{f}} +- {d['std']:{f}}"  # noqa: E731
        print(f"unsupervised seeds (n = {sm['selected_mmd']['n']}), MMD^2: "
              f"selected {ms(sm['selected_mmd'], '.4f')}, "
              f"last {ms(sm['last_mmd'], '.4f')}; within 1 std: selected {ms(sm['selected_within_1std'], '.3f')}, "
              f"last {ms(sm['last_within_1std'], '.3f')}")
        print_table(["reference", "value"], [[k, v] for k, v in sm["references"].items()])
