"""Importance-sampled NLL speed against the chunk size (decoder evaluations held at once).

The Burda et al. MLP (784-200-200-50, tanh, Bernoulli), k = 5000 samples per test image, on the
first ``--examples`` dynamically binarized MNIST test images. Chunk sizes are timed alternating,
``--reps`` rounds, so machine noise hits each alike; the table gives the best and median seconds,
the time the full 10,000-image test set would take at that rate, and the speed relative to the
default chunk (``vaekit.evaluation.nll`` default, 1024). Speed does not depend on the weights:
without ``--model`` a freshly initialised model of the recipe's architecture is timed.

    python bench/nll_chunks.py [--model runs/quality/burda/model] [--threads 2] [--examples 60]
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from vaekit import VAE, VAEConfig, load_dataset, load_model  # noqa: E402
from vaekit.evaluation.nll import log_likelihood  # noqa: E402

DEFAULT_CHUNK = inspect.signature(log_likelihood).parameters["max_samples"].default


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a saved model folder (default: a fresh Burda MLP)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--examples", type=int, default=60)
    p.add_argument("-k", type=int, default=5000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--chunks", type=int, nargs="+", default=[512, 1024, 2048, 4096, 16384])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        model = load_model(args.model)
    else:
        torch.manual_seed(0)
        model = VAE(VAEConfig(hidden_sizes=(200, 200), latent_dim=50, activation="tanh")).eval()
    data = load_dataset("mnist")
    torch.manual_seed(1)
    x = data.test.images[: args.examples].float().div(255).bernoulli()
    chunks = sorted(set(args.chunks) | {DEFAULT_CHUNK})
    times: dict[int, list[float]] = {c: [] for c in chunks}
    log_likelihood(model, x[:2], args.k, max_samples=DEFAULT_CHUNK)  # warm-up
    for _ in range(args.reps):
        for c in chunks:
            t = time.perf_counter()
            log_likelihood(model, x, args.k, max_samples=c)
            times[c].append(time.perf_counter() - t)
    ref = statistics.median(times[DEFAULT_CHUNK])
    rows, out = [], []
    for c in chunks:
        med = statistics.median(times[c])
        full_min = med / args.examples * 10_000 / 60
        rows.append([c, min(times[c]), med, full_min, ref / med])
        out.append({"chunk": c, "seconds": times[c], "median_s": med, "full_test_minutes": full_min,
                    "speed_vs_default": ref / med})
    print(f"NLL, k = {args.k}, {args.examples} test images, {args.threads} threads "
          f"({'model ' + args.model if args.model else 'fresh Burda MLP'}); default chunk {DEFAULT_CHUNK}")
    print_table(["chunk", "best s", "median s", "full test (min)", "speed vs default"], rows)
    write_results("nll_chunks", {"k": args.k, "examples": args.examples, "threads": args.threads,
                                 "model": args.model, "default_chunk": DEFAULT_CHUNK, "chunks": out})


if __name__ == "__main__":
    main()
