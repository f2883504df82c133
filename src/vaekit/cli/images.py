"""``vaekit sample`` and ``vaekit reconstruct``: image grids as PNG."""

from __future__ import annotations

import argparse

import torch

from vaekit.cli.common import check_output_path, data_for, open_model
from vaekit.data.dataset import eval_loader
from vaekit.errors import InputError
from vaekit.evaluation.images import save_grid


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sample", help="write a grid of generated images")
    s.add_argument("model", help="run folder or model folder")
    s.add_argument("-n", type=int, default=64, help="number of samples")
    s.add_argument("-o", "--out", default="samples.png", help="PNG path")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=run_sample)
    r = sub.add_parser("reconstruct", help="write test images (odd rows) above their reconstructions (even rows)")
    r.add_argument("model", help="run folder or model folder")
    r.add_argument("-n", type=int, default=32, help="number of test images")
    r.add_argument("-o", "--out", default="reconstructions.png", help="PNG path")
    r.add_argument("--data-dir", help="directory holding the dataset files")
    r.set_defaults(func=run_reconstruct)


def _check_n(n: int) -> None:
    if n <= 0 or n > 10000:
        raise InputError(f"-n must be in [1, 10000], got {n}")


def run_sample(args: argparse.Namespace) -> int:
    _check_n(args.n)
    check_output_path(args.out, example="samples.png")
    model, _, _ = open_model(args.model)
    torch.manual_seed(args.seed)
    images = model.sample(args.n)
    print(f"wrote {save_grid(images, args.out)}")
    return 0


def run_reconstruct(args: argparse.Namespace) -> int:
    _check_n(args.n)
    check_output_path(args.out, example="reconstructions.png")
    model, meta, _ = open_model(args.model)
    ds, data_cfg = data_for(meta, None, args.data_dir)
    x, _ = next(eval_loader(ds.test.subset(args.n), args.n, data_cfg.get("binarize", "none"),
                            data_cfg.get("binarize_seed", 0), "cpu").epoch(0))
    recon = model.reconstruct(x)
    per_row = 8
    rows = []
    for i in range(0, args.n, per_row):
        rows += [x[i : i + per_row], recon[i : i + per_row]]
    print(f"wrote {save_grid(torch.cat(rows), args.out, nrow=per_row)}")
    return 0
