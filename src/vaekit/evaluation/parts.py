"""The parts of an evaluation report, each an object that knows its own keys.

A part has a ``name`` (what ``--metrics`` takes), a ``title``, ``applies(ctx)`` (None, or why it
does not apply to this model or dataset), ``run(ctx) -> dict`` (its figures, JSON-safe),
``render(result, report) -> list[str]`` (its Markdown section body), ``summary(result)`` (rows
for the terminal: label, value) and ``better`` (for each headline figure, whether ``lower`` or
``higher`` is better; what a benchmark gate compares). The CLI, the Markdown report and the
benchmarks ask the part; none of them knows its keys.

Add a part by subclassing :class:`ReportPart` and adding it to :data:`PARTS` (order matters:
a part may read the results of the parts before it, as ``images`` reads ``elbo``'s KL).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from vaekit.anomaly.report_part import OODPart
from vaekit.errors import ModelFormatError
from vaekit.evaluation.elbo import evaluate_elbo
from vaekit.evaluation.images import save_grid
from vaekit.evaluation.latent import active_units, mutual_information
from vaekit.evaluation.nll import nll, supports_nll
from vaekit.evaluation.part_base import ReportPart, SkippedError, fmt
from vaekit.evaluation.reconstruction import reconstruction_metrics
from vaekit.evaluation.traversals import dims_by_kl, interpolations, reconstruction_rows, traversals

if TYPE_CHECKING:
    from vaekit.evaluation.report import EvalContext

FID_DATASETS = ("mnist", "fashion-mnist")


def _bits_per_dim(nats: float, model: Any) -> float:
    return nats / (math.prod(model.input_shape) * math.log(2.0))


class ElboPart(ReportPart):
    name, title = "elbo", "ELBO breakdown"
    better = {"neg_elbo": "lower", "recon": "lower"}

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        res = evaluate_elbo(ctx.model, ctx.test_batches(), seed=ctx.config.seed)
        if "neg_elbo" in res:
            res["neg_elbo_bits_per_dim"] = _bits_per_dim(res["neg_elbo"], ctx.model)
        return res

    def render(self, r: dict[str, Any], report: dict[str, Any]) -> list[str]:
        rows = [("-ELBO", r.get("neg_elbo")), ("recon -log p(x|z)", r.get("recon")), ("KL", r.get("kl")),
                ("-ELBO bits/dim", r.get("neg_elbo_bits_per_dim")), ("loss (model's weighting)", r.get("loss")),
                ("examples", r.get("n"))]
        lines = ["| term | value |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in rows if v is not None]
        if r.get("kl_per_dim"):
            lines += ["", f"KL per latent dim (nats): {', '.join(f'{v:.2f}' for v in r['kl_per_dim'])}"]
        return [*lines, ""]

    def summary(self, r: dict[str, Any]) -> list[tuple[str, Any]]:
        if "neg_elbo" not in r:
            return [("recon -log p(x|z)", r["recon"])]
        return [("-ELBO", r["neg_elbo"]), ("KL", r["kl"])]


@torch.no_grad()
def _posteriors(ctx: EvalContext) -> tuple[torch.Tensor, torch.Tensor]:
    means, logvars = [], []
    for x, y in ctx.test_batches():
        q = ctx.model.encode(x, y)
        means.append(q.mean.cpu())
        logvars.append(q.logvar.cpu())
    return torch.cat(means), torch.cat(logvars)


class LatentPart(ReportPart):
    name, title = "latent", "Latent code"
    better = {"active_units": "higher", "mutual_information": "higher"}

    def applies(self, ctx: EvalContext) -> str | None:
        if not ctx.model.gaussian_posterior:
            return f"{type(ctx.model).__name__} has no Gaussian posterior (active units and MI need one)"
        return None

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        was = ctx.model.training
        ctx.model.eval()
        try:
            mean, logvar = _posteriors(ctx)
        finally:
            ctx.model.train(was)
        g = torch.Generator().manual_seed(ctx.config.seed)
        return {"active_units": active_units(mean), "latent_dim": int(mean.shape[1]),
                "mutual_information": mutual_information(mean, logvar, generator=g), "n": int(mean.shape[0]),
                "au_threshold": 0.01}

    def render(self, r: dict[str, Any], report: dict[str, Any]) -> list[str]:
        return [f"Active units: **{r['active_units']} / {r['latent_dim']}** (Cov_x E[z_u|x] > {r['au_threshold']}); "
                f"I(x; z) = **{r['mutual_information']:.3f}** nats (aggregate posterior over {r['n']} test "
                "examples).", ""]

    def summary(self, r: dict[str, Any]) -> list[tuple[str, Any]]:
        return [("active units", r["active_units"]), ("I(x; z)", r["mutual_information"])]


class NLLPart(ReportPart):
    name, title = "nll", "Importance-sampled NLL"
    better = {"nll": "lower", "bits_per_dim": "lower"}

    def applies(self, ctx: EvalContext) -> str | None:
        ok, why = supports_nll(ctx.model)
        return None if ok else why

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        c = ctx.config
        res = nll(ctx.model, ctx.test_batches(c.nll_examples), k=c.k, seed=c.seed, max_samples=c.max_samples,
                  max_examples=c.nll_examples)
        res["threads"] = torch.get_num_threads()
        return res

    def render(self, r: dict[str, Any], report: dict[str, Any]) -> list[str]:
        return [f"-log p(x) ≈ **{r['nll']:.2f} ± {r['nll_stderr']:.2f}** nats "
                f"(**{r['bits_per_dim']:.4f} ± {r['bits_per_dim_stderr']:.4f}** bits/dim), k = {r['k']}, "
                f"n = {r['n']} test examples, ± one standard error across examples; "
                f"{report['timings_s'].get('nll', float('nan')):.0f} s on {r['threads']} thread(s).", ""]

    def summary(self, r: dict[str, Any]) -> list[tuple[str, Any]]:
        return [(f"NLL (k={r['k']})", f"{r['nll']:.3f} +- {r['nll_stderr']:.3f} nats, "
                 f"{r['bits_per_dim']:.4f} bits/dim")]


class ReconPart(ReportPart):
    name, title = "recon", "Reconstructions"
    better = {"mse": "lower", "ssim": "higher"}

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        n = ctx.config.recon_examples
        return reconstruction_metrics(ctx.model, ctx.test_batches(n), max_examples=n)

    def render(self, r: dict[str, Any], report: dict[str, Any]) -> list[str]:
        return [f"MSE per pixel **{r['mse']:.5f}** (± {r['mse_stderr']:.5f}), SSIM **{r['ssim']:.4f}** "
                f"(± {r['ssim_stderr']:.4f}) over {r['n']} test images (torchmetrics SSIM, 11x11 Gaussian "
                "window).", ""]

    def summary(self, r: dict[str, Any]) -> list[tuple[str, Any]]:
        return [("MSE", r["mse"]), ("SSIM", r["ssim"])]


@torch.no_grad()
def _samples(model: Any, n: int, seed: int, batch: int = 1000) -> torch.Tensor:
    """``n`` samples drawn under a forked RNG seeded with ``seed`` (the caller's stream is untouched)."""
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return torch.cat([model.sample(min(batch, n - i)).clamp(0, 1).cpu() for i in range(0, n, batch)])


class FIDPart(ReportPart):
    name, title = "fid", "FID (vaekit LeNet features)"
    better = {"fid": "lower"}

    def applies(self, ctx: EvalContext) -> str | None:
        name = ctx.dataset.name
        if name not in FID_DATASETS:
            return f"FID is defined here for {list(FID_DATASETS)} (one vaekit extractor each), not {name!r}"
        if ctx.model.conditional:
            return "conditional model: sample() needs labels; evaluate class-conditional samples separately"
        return None

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        from vaekit.evaluation.extractor import load_extractor
        from vaekit.evaluation.fid import fid, fid_floor

        name = ctx.dataset.name
        try:
            ext = load_extractor(name, ctx.config.extractor_path)
        except ModelFormatError as exc:
            raise SkippedError(str(exc)) from None
        images = _samples(ctx.model, ctx.config.fid_samples, ctx.config.seed)
        return {"fid": fid(images, name, ext, data=ctx.dataset), "samples": ctx.config.fid_samples,
                "fid_floor_train_vs_test": fid_floor(name, ext, data=ctx.dataset),
                "extractor": str(ext.artifact.path), "extractor_test_accuracy": ext.test_accuracy,
                "extractor_weights_hash": ext.weights_hash(), "against": f"{name} test split ({len(ctx.dataset.test)})"}

    def render(self, r: dict[str, Any], report: dict[str, Any]) -> list[str]:
        return [f"FID of {r['samples']} samples vs the {r['against']}: **{r['fid']:.2f}**; floor (10,000 train "
                f"images vs test): {r['fid_floor_train_vs_test']:.2f}. Extractor test accuracy "
                f"{fmt(r['extractor_test_accuracy'], 4)}, weights {r['extractor_weights_hash']}. Not comparable "
                "with Inception FIDs.", ""]

    def summary(self, r: dict[str, Any]) -> list[tuple[str, Any]]:
        return [("FID", r["fid"]), ("FID floor (train vs test)", r["fid_floor_train_vs_test"])]


class MIGPart(ReportPart):
    name, title = "mig", "Disentanglement (MIG)"
    better = {"mig_histogram": "higher", "mig_sampling": "higher"}
    ESTIMATORS = ("histogram", "sampling")

    def applies(self, ctx: EvalContext) -> str | None:
        if ctx.dataset.name != "dsprites":
            return f"MIG needs ground-truth factors; vaekit has them for dsprites, not {ctx.dataset.name!r}"
        if ctx.model.discrete_latent:
            return f"{type(ctx.model).__name__} has a discrete latent; MIG needs continuous codes (B, D)"
        return None

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        from vaekit.evaluation.mig import dsprites_mig

        c = ctx.config
        return dsprites_mig(ctx.model, n_histogram=c.mig_histogram_images, n_sampling=c.mig_sampling_images,
                            seed=c.seed)

    def headline(self, r: dict[str, Any]) -> dict[str, float]:
        return {f"mig_{e}": r[e][f"mig_{e}"] for e in self.ESTIMATORS if e in r}

    def render(self, r: dict[str, Any], report: dict[str, Any]) -> list[str]:
        lines = ["| estimator | MIG | factors | per factor | images |", "|---|---|---|---|---|"]
        for est in self.ESTIMATORS:
            e = r[est]
            per = ", ".join(f"{n} {v:.3f}" for n, v in zip(e["factor_names"], e["per_factor"], strict=True))
            lines.append(f"| {e['description']} | **{e[f'mig_{est}']:.3f}** | {len(e['factor_names'])} | {per} | "
                         f"{e.get('images', e.get('n'))} |")
        return [*lines, ""]

    def summary(self, r: dict[str, Any]) -> list[tuple[str, Any]]:
        return [(f"MIG ({e} estimator)", v) for e, v in zip(self.ESTIMATORS, self.headline(r).values(), strict=True)]


class ImagesPart(ReportPart):
    name, title = "images", "Images"
    TITLES = {"samples": "Samples (z ~ N(0, I))", "reconstructions": "Test inputs (odd rows) above reconstructions",
              "interpolations": "Interpolations between posterior means (one pair per row)",
              "traversals": "Latent traversals"}

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        model, out = ctx.model, ctx.out_dir
        files: dict[str, str] = {}
        notes: dict[str, str] = {}
        seed = ctx.config.seed
        if model.conditional:
            notes["samples"] = "conditional model: unconditional samples not drawn"
        else:
            files["samples"] = save_grid(_samples(model, 64, seed), out / "samples.png", nrow=8).name
        x = ctx.first_test_images(32)
        files["reconstructions"] = save_grid(reconstruction_rows(model, x, 8), out / "reconstructions.png",
                                             nrow=8).name
        if model.discrete_latent or model.conditional:
            notes["interpolations"] = "needs an unconditional encoder with continuous codes"
            return {"files": files, "notes": notes}
        pairs = ctx.first_test_images(16)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            inter = interpolations(model, pairs[:8], pairs[8:16], steps=10)
            kl = ctx.results.get("elbo", {}).get("kl_per_dim")
            D = model.encode(x[:1]).mean.shape[1]
            dims = dims_by_kl(kl, ctx.config.traversal_dims) if kl else list(range(min(D, ctx.config.traversal_dims)))
            trav = traversals(model, x[:1], dims, span=3.0, steps=9)
        files["interpolations"] = save_grid(inter, out / "interpolations.png", nrow=10).name
        files["traversals"] = save_grid(trav, out / "traversals.png", nrow=9).name
        notes["traversals"] = (f"rows: latent dims {dims} " + ("(largest test KL first)" if kl else "(in index order)")
                               + ", each from -3 to +3 around the first test image's posterior mean")
        return {"files": files, "notes": notes}

    def render(self, r: dict[str, Any], report: dict[str, Any]) -> list[str]:
        lines: list[str] = []
        for key, file in r["files"].items():
            note = r["notes"].get(key)
            lines += [f"**{self.TITLES.get(key, key)}**" + (f": {note}" if note else ""), "", f"![{key}]({file})", ""]
        for key, note in r["notes"].items():
            if key not in r["files"]:
                lines += [f"{key}: {note}", ""]
        return lines

    def summary(self, r: dict[str, Any]) -> list[tuple[str, Any]]:
        return [("images", ", ".join(r["files"].values()))]


# the OOD part lives with the anomaly scores (vaekit.anomaly.report_part)
PARTS: dict[str, ReportPart] = {p.name: p for p in (ElboPart(), LatentPart(), NLLPart(), ReconPart(), FIDPart(),
                                                    MIGPart(), ImagesPart(), OODPart())}
