"""AAE pilots: one 2-D mixture-prior AAE variant trained for a time budget, its MMD^2 to the prior.

Variants (``--variant``): ``det`` (the families recipe: deterministic encoder, 3 discriminator
steps), ``gauss`` (Gaussian encoder), ``d5`` (5 discriminator steps), ``gen5e-5``/``gen2e-5``/
``gen5e-4``/``gen1e-3`` (generator-phase rate), ``r1``/``r10``/``r100`` (R1 penalty), ``lg``
(label-guided), ``lgr10`` (label-guided + R1 10). Training holds out the last 2,000 training
images; every ``--track-every`` steps the MMD^2 between their codes and prior samples is logged
(held-out, never trained on), and the test MMD^2 is measured at the end with the families
benchmark's ``aae_figures`` (a uniform subsample of the test codes, with the same references).
Writes bench/results/aae_pilots.json (one entry per variant, accumulated across invocations).

    python bench/aae_pilots.py --variant r10 --seconds 600 [--batch 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import families as F  # noqa: E402
from common import RESULTS, print_table, write_results  # noqa: E402

from vaekit.data import load_dataset  # noqa: E402
from vaekit.data.dataset import to_unit_float  # noqa: E402
from vaekit.models import AAE, AAEConfig  # noqa: E402
from vaekit.objectives.mmd import mmd_rbf  # noqa: E402
from vaekit.training import Callback, DataConfig, TrainConfig, Trainer  # noqa: E402
from vaekit.training.monitors import MonitorConfig  # noqa: E402

BASE = {"latent_dim": 2, "prior": "mixture", "disc_steps": 3}
VARIANTS = {
    "det": {}, "gauss": {"encoder": "gaussian"}, "d5": {"disc_steps": 5},
    "gen5e-5": {"gen_lr": 5e-5}, "gen2e-5": {"gen_lr": 2e-5}, "gen5e-4": {"gen_lr": 5e-4}, "gen1e-3": {"gen_lr": 1e-3},
    "r1": {"disc_r1": 1.0}, "r10": {"disc_r1": 10.0}, "r100": {"disc_r1": 100.0},
    "lg": {"label_guided": True}, "lgr10": {"label_guided": True, "disc_r1": 10.0},
}
HELD_OUT = 2000


class Track(Callback):
    """Time budget, and the held-out MMD^2 every ``every`` steps."""

    name = "aae_track"

    def __init__(self, x_val: torch.Tensor, seconds: float, every: int):
        self.x_val, self.seconds, self.every = x_val, seconds, every
        self.t0 = 0.0
        self.trajectory: list[tuple[int, float]] = []

    def on_fit_start(self, trainer) -> None:
        self.t0 = time.perf_counter()

    def on_step_end(self, trainer, record) -> None:
        if time.perf_counter() - self.t0 > self.seconds and not trainer._stop_reason:
            trainer.request_stop(f"time budget of {self.seconds:.0f} s")
        if trainer.state.step % self.every:
            return
        m = trainer.model
        was = m.training
        m.eval()
        with torch.no_grad():
            z = m.encode(self.x_val).mean
            prior = m.sample_prior(z.shape[0], torch.Generator().manual_seed(11))
            self.trajectory.append((trainer.state.step, mmd_rbf(z, prior, (0.25, 0.5, 1.0, 2.0, 4.0))))
        m.train(was)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", choices=sorted(VARIANTS), default="det")
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--track-every", type=int, default=500)
    p.add_argument("--mmd-points", type=int, default=2000)
    p.add_argument("--runs", default="runs/bench-aae-pilots")
    args = p.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("mnist")
    n_train = len(data.train) - HELD_OUT
    track = Track(to_unit_float(data.train.images[n_train:]), args.seconds, args.track_every)
    torch.manual_seed(0)
    model = AAE(AAEConfig(**BASE, **VARIANTS[args.variant]))
    cfg = TrainConfig(epochs=1000, batch_size=args.batch, seed=0, threads=1, checkpoint_every=0, eval_every=0,
                      progress=False, tensorboard="off", keep_checkpoints=1)
    t0 = time.perf_counter()
    res = Trainer(model, data, cfg, data_config=DataConfig(dataset="mnist", train_subset=n_train),
                  run_dir=Path(args.runs) / f"{args.variant}-b{args.batch}", callbacks=[track],
                  monitor=MonitorConfig(enabled=False)).fit(resume=False)
    x, y = to_unit_float(data.test.images), data.test.labels
    figs = F.aae_figures(model.eval(), x, y, args, f"aae_pilot_{args.variant}.png")
    entry = {"variant": args.variant, "config": VARIANTS[args.variant], "batch": args.batch, "steps": res.steps,
             "train_s": round(time.perf_counter() - t0, 1),
             "held_out_mmd": [{"step": s, "mmd": v} for s, v in track.trajectory],
             **{k: v for k, v in figs.items() if k.startswith("mmd") or k == "scatter_png"}}
    path = RESULTS / "aae_pilots.json"
    runs = json.loads(path.read_text()).get("runs", {}) if path.is_file() else {}
    runs[f"{args.variant}-b{args.batch}"] = entry
    write_results("aae_pilots", {"runs": runs})
    vals = [v for _, v in track.trajectory]
    print_table(["variant", "steps", "test MMD^2", "held-out MMD^2 min", "max", "2x-wider reference"],
                [[args.variant, res.steps, figs["mmd_codes_vs_prior"], min(vals) if vals else "-",
                  max(vals) if vals else "-", figs["mmd_wide_modes_vs_prior"]]])


if __name__ == "__main__":
    main()
