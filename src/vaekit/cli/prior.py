"""``vaekit train-prior RUN``: fit a trained VQ-VAE's code prior so that ``vaekit sample`` works."""

from __future__ import annotations

import argparse

import torch

from vaekit.cli.common import data_for, open_model, print_table, resolve_model, train_examples
from vaekit.errors import InputError
from vaekit.models.base import read_model_artifact
from vaekit.models.vqvae import VQVAE
from vaekit.models.vqvae_prior import train_code_prior


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-prior", help="train the code prior of a trained VQ-VAE (after `vaekit train`)")
    p.add_argument("model", help="run folder or model folder of a vqvae")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--data-dir", help="directory holding the dataset files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, meta, _ = open_model(args.model, device)
    if not isinstance(model, VQVAE):
        raise InputError(f"{args.model} holds a {model.family!r} model; train-prior needs a vqvae")
    ds, data_cfg = data_for(meta, None, args.data_dir)
    torch.manual_seed(args.seed)
    hist = train_code_prior(
        model, train_examples(ds, data_cfg), test=ds.test.subset(data_cfg.get("test_subset")),
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        binarize=data_cfg.get("binarize", "none"), max_steps=args.max_steps,
        log=lambda r: print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())))
    model_dir, _ = resolve_model(args.model)
    metrics = dict(read_model_artifact(model_dir).metrics or {})  # verified again: never re-bless a changed file
    metrics["prior"] = hist
    model.save(model_dir, metadata=meta, metrics=metrics)
    print_table([("steps", hist["steps"]), ("test nll (nats per grid)", hist["test_nll"][-1]),
                 ("test bits per index", hist["test_bits_per_index"]), ("seconds", hist["seconds"])],
                "code prior")
    print(f"model: {model_dir}")
    return 0
