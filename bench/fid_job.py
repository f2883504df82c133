"""How the FID job's threshold is set (vaekit monitor fid, docs/monitoring.md): the figures, measured on MNIST.

The VAE is bench/drift.py's MNIST model (runs/bench-drift/mnist/model: run bench/drift.py --train-only first)
and the extractor the default one (vaekit fid-extractor train mnist). Measured:

* the split-half FID of the test split at N = 500, 1,000, 2,000 and 5,000 (3 random splits each);
* the calibration at the job's default N = 2,000 (3 draws, the default) and the spread of 5 draws;
* the FID of changed versions of the model (2 seeds each) and whether each is above the threshold.

    python bench/fid_job.py          # about 70 s on one thread

torch.set_num_threads(1); results in bench/results/fid_job.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from vaekit.data import ImageDataset, load_dataset  # noqa: E402
from vaekit.evaluation.extractor import load_extractor  # noqa: E402
from vaekit.models import VAE  # noqa: E402
from vaekit.models.base import load_model  # noqa: E402
from vaekit.monitoring.fid_watch import calibrate, samples_fid, split_half_fid  # noqa: E402
from vaekit.training import TrainConfig, Trainer  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "runs" / "bench-drift" / "mnist" / "model"
N = 2000


def changed_versions(data: Any, tmp: Path) -> dict[str, Any]:
    """The model with its decoder changed in a few ways, and the architecture trained for one small epoch."""
    out: dict[str, Any] = {}
    for name, shift in (("output bias +0.5", 0.5), ("output bias -0.5", -0.5), ("output bias +2", 2.0)):
        m = load_model(MODEL)
        with torch.no_grad():
            m.decoder.out.bias.add_(shift)
        out[name] = m.eval()
    for name, sigma in (("decoder weights + N(0, 0.02^2)", 0.02), ("decoder weights + N(0, 0.05^2)", 0.05)):
        m = load_model(MODEL)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in m.decoder.parameters():
                p.add_(sigma * torch.randn(p.shape, generator=g))
        out[name] = m.eval()
    small = ImageDataset("mnist", data.train.subset(2000), data.test.subset(500), data.classes, data.provenance)
    torch.manual_seed(0)
    short = VAE(load_model(MODEL).config)
    Trainer(short, small, TrainConfig(epochs=1, batch_size=64, checkpoint_every=0, progress=False, tensorboard="off",
                                      seed=0, eval_batch_size=500), run_dir=tmp / "short").fit()
    out["1 epoch on 2,000 images"] = short.eval()
    return out


def main() -> int:
    import tempfile

    torch.set_num_threads(1)
    ext, data, model = load_extractor("mnist"), load_dataset("mnist"), load_model(MODEL).eval()
    t0 = time.perf_counter()
    split = {n: [split_half_fid("mnist", n, ext, seed=s, data=data) for s in range(3)] for n in (500, 1000, 2000, 5000)}
    cal = calibrate(model, "bench-drift mnist", N, "mnist", ext, data=data)  # the defaults: 3 draws, multiple 3
    five = [samples_fid(model, N, s, "mnist", ext, data) for s in range(5)]
    t = time.perf_counter()
    samples_fid(model, N, 99, "mnist", ext, data)
    check_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        changed = {name: [samples_fid(m, N, s, "mnist", ext, data) for s in (10, 11)]
                   for name, m in changed_versions(data, Path(tmp)).items()}
    print(f"split-half FID by N: { {n: [round(v, 2) for v in vs] for n, vs in split.items()} }")
    print(f"calibration at N = {N}: baseline {cal.baseline:.2f} (std {cal.std:.2f}), split-half {cal.split_half:.2f}, "
          f"margin {cal.margin:.2f}, threshold {cal.threshold:.2f}; 5 draws {[round(v, 1) for v in five]}")
    for name, v in changed.items():
        print(f"  {name}: {[round(x, 1) for x in v]} above the threshold: {[x > cal.threshold for x in v]}")
    write_results("fid_job", {
        "torch_threads": 1, "extractor_test_accuracy": ext.test_accuracy, "n_samples": N,
        "split_half": {str(n): v for n, v in split.items()}, "calibration": cal.to_doc(),
        "five_draws": {"fids": five, "mean": float(np.mean(five)), "std": float(np.std(five, ddof=1))},
        "check_s": check_s, "changed_versions": {k: {"fid": v, "fires": [x > cal.threshold for x in v]}
                                                 for k, v in changed.items()},
        "wall_s": time.perf_counter() - t0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
