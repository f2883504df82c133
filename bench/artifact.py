"""What verification costs: save, verify and load times of model artifacts, and a reference profile.

For each model (freshly initialised: the cost depends on sizes, not on the weights) it times
``model.save`` (serialize, hash, fsync, atomic rename), ``verify_artifact`` (re-hash every file),
``load_model`` (verify, build the model, strict config and weights) and, to show where that time
goes, ``build_model`` alone (random initialisation) and reading the raw safetensors file with no
checks; the median of ``--reps`` runs. Then ``compute_profile`` on the
first ``--examples`` MNIST test images (held out) for the default VAE.

    python bench/artifact.py [--threads 2] [--reps 5] [--examples 5000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from vaekit import load_dataset, load_model  # noqa: E402
from vaekit.artifact import verify_artifact  # noqa: E402
from vaekit.models import VAEConfig, VQVAEConfig, build_model  # noqa: E402
from vaekit.registry.profile import compute_profile  # noqa: E402

MODELS = {
    "vae (784-400-20)": VAEConfig(),
    "vae (784-1024-1024-64)": VAEConfig(hidden_sizes=(1024, 1024), latent_dim=64),
    "vqvae (default)": VQVAEConfig(),
}


def _median(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--examples", type=int, default=5000)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows, out = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in MODELS.items():
            torch.manual_seed(0)
            model = build_model(cfg).eval()
            folder = Path(tmp) / name.split()[0]
            save_s = _median(lambda m=model, f=folder: m.save(f), args.reps)
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            verify_s = _median(lambda f=folder: verify_artifact(f), args.reps)
            load_s = _median(lambda f=folder: load_model(f), args.reps)
            build_s = _median(lambda c=cfg: build_model(c), args.reps)
            raw_s = _median(lambda f=folder: load_file(str(f / "model.safetensors")), args.reps)
            rows.append([name, f"{size / 2**20:.1f}", f"{save_s * 1e3:.1f}", f"{verify_s * 1e3:.1f}",
                         f"{load_s * 1e3:.1f}", f"{build_s * 1e3:.1f}", f"{raw_s * 1e3:.1f}"])
            out.append({"model": name, "mib": size / 2**20, "save_s": save_s, "verify_s": verify_s,
                        "load_model_s": load_s, "build_model_s": build_s, "raw_safetensors_s": raw_s})
    print_table(["model", "MiB", "save ms", "verify ms", "load_model ms", "build_model ms", "raw read ms"], rows)
    data = load_dataset("mnist")
    x = data.test.images[: args.examples].float() / 255
    torch.manual_seed(0)
    model = build_model(VAEConfig()).eval()
    t = time.perf_counter()
    prof = compute_profile(model, x, source=f"mnist test[:{args.examples}]")
    profile_s = time.perf_counter() - t
    lat = prof.latency_ms
    print(f"\ncompute_profile, default VAE, {args.examples} held-out images: {profile_s:.2f} s "
          f"(batch-1 latency p50 {lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms, {args.threads} threads)")
    path = write_results("artifact", {"args": vars(args), "artifacts": out,
                                      "profile": {"examples": args.examples, "seconds": profile_s,
                                                  "latency_ms": {k: lat[k] for k in ("p50", "p99", "runs")}}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
