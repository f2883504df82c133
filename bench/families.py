"""Model families side by side: each family trained on MNIST for the same wall-clock budget, then
measured with the same figures plus its own; IWAE vs VAE NLL; beta-TCVAE vs VAE vs beta-VAE MIG on dSprites.

Sections (``--sections``, default all three):

* ``mnist``: vae, beta-vae (beta 4), iwae (k 5), beta-tcvae (MSS), cvae (8-D and 4-D z, learned
  p(z|c)), vq-vae with and without
  dead-code restart, aae (2-D code, 10-component mixture prior), each trained through the
  Trainer on grey MNIST for ``--budget-s`` seconds. Figures: test reconstruction MSE (per pixel),
  FID of ``--fid-samples`` samples (the issue-4 LeNet extractor), and per family: test KL and
  active units; TC/MI/dim-KL (MSS); code usage, perplexity and unused codes over the test set, the
  code prior's test NLL and the FID of its samples; per-class accuracy of conditional samples
  (the FID extractor's classifier); discriminator accuracy and MMD between encoded test points
  and prior samples (with reference values).
* ``aae``: the 2-D mixture-prior AAE trained longer (``--aae-budget-s``): MMD to the prior beside
  reference distributions, and a scatter plot of the codes coloured by class.
* ``nll``: VAE and IWAE (k = 5), the same 784-400-20 MLP, trained the same number of epochs on
  dynamically binarized MNIST; importance-sampled test NLL (``--nll-k`` samples) on the same
  examples, with the paired difference and its standard error.
* ``dsprites``: VAE, beta-VAE (4), beta-TCVAE (6) with MSS and with MWS, 4096-512-512-10 MLP,
  ``--seeds`` seeds each, ``--dsprites-budget-s`` seconds each on a ``--dsprites-train`` subset;
  MIG with both of the issue-4 estimators (histogram and sampling-based), mean +- std over seeds.

Trained models are kept under ``--runs`` (default ``runs/bench-families``); ``--reuse`` skips
training where a finished model exists, so figures can be recomputed after the evaluation suite
changes. Writes bench/results/families.json and PNGs under bench/results/families/.

    python bench/families.py                                  # everything (about 1.5 h on 1 thread)
    python bench/families.py --sections mnist --budget-s 150
    python bench/families.py --sections dsprites --seeds 3 --dsprites-budget-s 120
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIGURES, RESULTS, write_results  # noqa: E402
from sections import aae, dsprites, mnist, nll  # noqa: E402

SECTIONS = {"mnist": mnist, "aae": aae, "nll": nll, "dsprites": dsprites}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="mnist,aae,nll,dsprites")
    p.add_argument("--only", default="", help="comma-separated MNIST runs (default: all)")
    p.add_argument("--budget-s", type=float, default=150.0, help="training seconds per MNIST family")
    p.add_argument("--prior-budget-s", type=float, default=450.0,
                   help="seconds for the VQ code prior, including encoding the training set")
    p.add_argument("--fid-samples", type=int, default=5000)
    p.add_argument("--test-subset", type=int, default=None, help="MNIST test images used (default: all 10,000)")
    p.add_argument("--cvae-per-class", type=int, default=1000)
    p.add_argument("--mmd-points", type=int, default=2000)
    p.add_argument("--aae-budget-s", type=float, default=600.0, help="training seconds of each AAE section run")
    p.add_argument("--aae-seeds", type=int, default=3, help="unsupervised AAE seeds in the aae section")
    p.add_argument("--aae-only", default="", help="comma-separated AAE runs (s0,s1,...,label_guided; default all)")
    p.add_argument("--nll-epochs", type=int, default=10)
    p.add_argument("--nll-k", type=int, default=1000)
    p.add_argument("--nll-examples", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--dsprites-budget-s", type=float, default=150.0)
    p.add_argument("--dsprites-train", type=int, default=60_000, help="training images (float copies: 16 KB each)")
    p.add_argument("--mig-examples", type=int, default=10_000, help="images for the histogram MIG")
    p.add_argument("--mig-sampling", type=int, default=10_000,
                   help="images for the sampling MIG's aggregate posterior (50,000 take 2 min per model)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default="runs/bench-families")
    p.add_argument("--reuse", action="store_true", help="load finished models instead of retraining")
    p.add_argument("--out", default="families", help="results name: bench/results/<out>.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    FIGURES.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"args": vars(args)}
    path = RESULTS / f"{args.out}.json"
    if path.is_file():  # sections run separately accumulate in one file
        results = {**json.loads(path.read_text()), "args": vars(args)}
    sections = args.sections.split(",")
    for name, section in SECTIONS.items():
        if name in sections:
            results[name] = section.run(args)
            write_results(args.out, {k: v for k, v in results.items() if k not in ("benchmark", "machine")})
    report(results)


def report(results: dict[str, Any]) -> None:
    for name, section in SECTIONS.items():
        if name in results and "runs" in results[name]:
            section.report(results[name])


if __name__ == "__main__":
    main()
