"""The ``ood`` part of an evaluation report (``vaekit evaluate RUN --metrics ood --ood-data ...``).

The model's test images are split (seeded, uniform) in two halves: one fits the scores'
statistics (Mahalanobis, typicality, ensemble), the other is the in-distribution side of every
comparison. The OOD side is another dataset's test split (as many images) or corrupted copies of
the scored half. Binarized models see OOD images binarized the same way (one seeded draw).
Nothing is fit on OOD images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vaekit.anomaly.ood import DEFAULT_SCORES, ood_datasets, ood_report
from vaekit.evaluation.part_base import ReportPart, fmt

if TYPE_CHECKING:
    from vaekit.evaluation.report import EvalContext


class OODPart(ReportPart):
    name, title = "ood", "Out-of-distribution detection"
    better = {"auroc_ensemble": "higher"}  # mean AUROC of the ensemble score over the OOD sets

    def applies(self, ctx: EvalContext) -> str | None:
        data = getattr(ctx.config, "ood_data", None)
        if data is None:
            return "no OOD data chosen (--ood-data mnist|fashion-mnist|corrupted)"
        if data == ctx.dataset.name:
            return f"the OOD data {data!r} is the model's own dataset"
        if data != "corrupted" and tuple(ctx.model.input_shape) != (1, 28, 28):
            return f"{data} images are (1, 28, 28); the model takes {tuple(ctx.model.input_shape)}"
        if ctx.model.conditional:
            return "conditional model: the scores need a condition, which OOD images do not have"
        return None

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        from vaekit.data.dataset import binarize_static, mix_seed

        c = ctx.config
        x = torch.cat([b[0].cpu() for b in ctx.test_batches(c.ood_examples)])
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(c.seed))
        half = x.shape[0] // 2
        ref, xin = x[perm[:half]], x[perm[half:]]
        outs = ood_datasets(c.ood_data, xin, n=xin.shape[0], seed=c.seed)
        if ctx.binarize != "none":
            outs = {k: binarize_static(v, mix_seed(c.seed, i, 0x00D)) for i, (k, v) in enumerate(outs.items())}
        res = ood_report(ctx.model, xin, outs, DEFAULT_SCORES, reference=ref,
                         png_path=ctx.out_dir / "ood_histograms.png", batch_size=c.batch_size, seed=c.seed)
        res.pop("png", None)
        ens = res["scores"].get("ensemble", {})
        if "ood" in ens:
            res["auroc_ensemble"] = sum(m["auroc"] for m in ens["ood"].values()) / len(ens["ood"])
        res.update({"ood_data": c.ood_data, "files": {"histograms": "ood_histograms.png"},
                    "reference": f"{half} of the test images (seeded half), never OOD images"})
        return res

    def render(self, r: dict[str, Any], report: dict[str, Any]) -> list[str]:
        sets = list(r["n_out"])
        against = ", ".join(f"{k} ({n})" for k, n in r["n_out"].items())
        lines = [f"{r['n_in']} in-distribution test images against {against}; scores fit on {r['reference']}. "
                 "OOD is the positive class; larger scores are more anomalous.", "",
                 "| score | " + " | ".join(f"{s} AUROC / AUPR / FPR95" for s in sets) + " | ms/image |",
                 "|---|" + "---|" * (len(sets) + 1)]
        for name, e in r["scores"].items():
            if "skipped" in e:
                lines.append(f"| `{name}` | skipped: {e['skipped']} |")
                continue
            cells = [f"{fmt(e['ood'][s]['auroc'])} / {fmt(e['ood'][s]['aupr'])} / {fmt(e['ood'][s]['fpr95'])}"
                     for s in sets]
            lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {e['seconds_per_image'] * 1e3:.3f} |")
        return [*lines, "", f"![histograms]({r['files']['histograms']})", ""]

    def summary(self, r: dict[str, Any]) -> list[tuple[str, Any]]:
        rows = []
        for name, e in r["scores"].items():
            if "ood" in e:
                rows.append((f"OOD AUROC {name}", ", ".join(f"{s} {m['auroc']:.3f}" for s, m in e["ood"].items())))
        return rows
