"""``vaekit evaluate RUN_OR_MODEL``: test-split ELBO with its recon and KL terms, or a full report.

Without ``--metrics`` it prints the ELBO breakdown and writes ``eval.json`` (as before). With
``--metrics elbo,latent,nll,recon,fid,mig,images,ood`` (or ``all``; ``ood`` needs ``--ood-data``) it runs
those parts of the evaluation suite and writes ``report.json``, ``report.md`` and PNG images into ``--report-dir``
(default ``RUN/report``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from vaekit.cli.common import check_output_path, data_for, open_model, print_table, write_json
from vaekit.data.dataset import eval_loader
from vaekit.errors import InputError
from vaekit.evaluation.elbo import evaluate_elbo


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a trained model on the test split")
    p.add_argument("model", help="run folder or model folder")
    p.add_argument("--dataset", help="dataset to evaluate on (default: the one it was trained on)")
    p.add_argument("--data-dir", help="directory holding the dataset files")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior samples")
    p.add_argument("-o", "--out", help="JSON file to write (default: RUN/eval.json for a run folder; with "
                   "--metrics, the report JSON, with its Markdown and images beside it)")
    p.add_argument("--metrics", help="comma-separated parts of the evaluation suite to run and report: "
                   "elbo,latent,nll,recon,fid,mig,images,ood or all (default: ELBO only, no report)")
    p.add_argument("--report-dir", help="report folder (default: the folder of -o, else RUN/report, else a "
                   "MODEL-report folder beside a model folder: nothing is written into a model folder unasked)")
    p.add_argument("-k", type=int, default=5000, help="importance samples per example for the NLL")
    p.add_argument("--nll-examples", type=int, help="first N test examples for the NLL (default: all)")
    p.add_argument("--examples", type=int, help="evaluate every part on the first N test examples (default: all)")
    p.add_argument("--fid-samples", type=int, default=10000, help="generated images for FID")
    p.add_argument("--mig-images", type=int, default=100_000,
                   help="dSprites images for the sampling MIG (0: the whole grid, 737,280)")
    p.add_argument("--extractor", help="FID extractor folder (default: the vaekit cache)")
    p.add_argument("--ood-data", choices=("mnist", "fashion-mnist", "corrupted"),
                   help="OOD images for --metrics ood: another dataset's test split or corrupted test images")
    p.add_argument("--ood-examples", type=int, default=4000,
                   help="test images for --metrics ood (half fit the scores, half are scored)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    # a bad output path fails here, before minutes of evaluation
    if args.out:
        check_output_path(args.out)
    if args.report_dir:
        check_output_path(Path(args.report_dir) / "report.json", option="--report-dir")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, meta, run_dir = open_model(args.model, device)
    ds, data_cfg = data_for(meta, args.dataset, args.data_dir)
    if args.metrics:
        return run_report(args, model, ds, data_cfg, run_dir)
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


def run_report(args: argparse.Namespace, model, ds, data_cfg: dict, run_dir: Path | None) -> int:
    from vaekit.evaluation.report import EvalConfig, evaluate_model, summary_rows

    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    config = EvalConfig(metrics=metrics, k=args.k, nll_examples=args.nll_examples, fid_samples=args.fid_samples,
                        mig_sampling_images=args.mig_images or None, batch_size=args.batch_size, seed=args.seed,
                        extractor_path=args.extractor, test_examples=args.examples, ood_data=args.ood_data,
                        ood_examples=args.ood_examples)
    out, stem = report_location(args, run_dir)
    binarize = data_cfg.get("binarize", "none")
    print(f"evaluating {args.model} on {ds.name} (test split, binarize={binarize}): {', '.join(config.metrics)}")
    report = evaluate_model(model, ds, out, config, binarize=binarize, name=str(args.model), progress=True,
                            stem=stem)
    m = report["metrics"]
    skipped = {part: res["skipped"] for part, res in m.items() if "skipped" in res}
    rows = summary_rows(report)
    print_table(rows, "results (nats per example)")
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    if len(skipped) == len(m):  # nothing asked for could run: a script must not read this as success
        why = "; ".join(f"{part}: {reason}" for part, reason in skipped.items())
        print(f"error: none of the requested metrics could run ({why})", file=sys.stderr)
        return 1
    return 0


def report_location(args: argparse.Namespace, run_dir: Path | None) -> tuple[Path, str]:
    """(report folder, file stem): ``--report-dir``, else the folder and name of ``-o``, else RUN/report,
    else ``MODEL-report`` beside a plain model folder (a model folder is an artifact: never written into)."""
    stem = "report"
    if args.out:
        o = Path(args.out)
        if o.suffix != ".json":
            raise InputError(f"-o must name a .json file, got {str(o)!r}")
        stem = o.stem
    if args.report_dir:
        return Path(args.report_dir), stem
    if args.out:
        return Path(args.out).parent, stem
    if run_dir is not None:
        return run_dir / "report", stem
    model = Path(args.model)
    return model.parent / f"{model.name}-report", stem
