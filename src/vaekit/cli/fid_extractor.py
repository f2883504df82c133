"""``vaekit fid-extractor train|info DATASET``: the classifier whose features FID is computed on."""

from __future__ import annotations

import argparse

from vaekit.cli.common import print_table


def add_parser(sub: argparse._SubParsersAction) -> None:
    from vaekit.data import LOADERS

    p = sub.add_parser("fid-extractor", help="train or inspect the FID feature extractor of a dataset")
    verbs = p.add_subparsers(dest="fid_verb", required=True)
    t = verbs.add_parser("train", help="train the LeNet-style extractor on the train split and save it")
    t.add_argument("dataset", choices=sorted(LOADERS))
    t.add_argument("--out", help="artifact folder (default: <vaekit cache>/extractors/DATASET)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=int, default=6)
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.set_defaults(func=run_train)
    i = verbs.add_parser("info", help="print where the extractor is and its test accuracy")
    i.add_argument("dataset", choices=sorted(LOADERS))
    i.add_argument("--path", help="artifact folder (default: the cache location)")
    i.set_defaults(func=run_info)


def run_train(args: argparse.Namespace) -> int:
    from vaekit.artifact import update_metrics
    from vaekit.evaluation.extractor import load_extractor, train_extractor
    from vaekit.evaluation.fid import fid_floor

    folder = train_extractor(args.dataset, out_dir=args.out, seed=args.seed, epochs=args.epochs,
                             threads=args.threads, progress=True)
    ext = load_extractor(args.dataset, folder)
    floor = fid_floor(args.dataset, ext)
    metrics = {**(ext.artifact.metrics or {}), "fid_train10k_vs_test": floor}
    update_metrics(folder, metrics)  # the artifact is rewritten with its manifest: never edited in place
    print_table([("test accuracy", ext.test_accuracy), ("FID train (10k) vs test", floor),
                 ("train time s", metrics["train_time_s"]), ("artifact", str(folder))],
                f"FID extractor for {args.dataset} (seed {args.seed}, {args.epochs} epochs)")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from vaekit.evaluation.extractor import default_extractor_dir, load_extractor

    folder = args.path or default_extractor_dir(args.dataset)
    ext = load_extractor(args.dataset, folder)
    metrics = ext.artifact.metrics or {}
    rows = [(k, v) for k, v in metrics.items()] + [("weights hash", ext.weights_hash()), ("artifact", str(folder))]
    print_table(rows, f"FID extractor for {args.dataset}")
    return 0
