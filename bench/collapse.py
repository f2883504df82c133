"""Posterior collapse and its cures, on real MNIST (dynamic binarization).

A VAE with a conv encoder and a PixelCNN decoder (strong enough to model digits without z)
is trained in several arms with the same step budget:

  a  beta = 1 from step 0 (the collapse-prone baseline), collapse monitor warns
  b  linear KL warm-up
  c  cyclical annealing (Fu et al. 2019)
  d  free bits, lambda = 0.5 nats per latent dimension
  e  decoder-input dropout
  f  as (a), with monitor.on_collapse=recover (reload from before the onset, free bits on)
  g  capacity annealing (Burgess et al. 2018), C rising to --capacity nats over the budget
  h  total-KL floor max(KL, --kl-floor nats): free bits on the whole code instead of per dimension

For each arm: final test KL, active units and MI on held-out data, the test -ELBO (an NLL
proxy, one posterior sample), and whether and when the collapse detector fired. The monitor
overhead (share of the wall time spent in AU/MI checks, every --check-every steps) is
reported per arm.

    python bench/collapse.py                      # all arms, default budget
    python bench/collapse.py --arms a f --steps 600
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, print_table, write_results  # noqa: E402

from vaekit import VAE, DataConfig, TrainConfig, Trainer, VAEConfig, load_dataset, read_metrics  # noqa: E402
from vaekit.training.monitors import MonitorConfig  # noqa: E402
from vaekit.training.schedules import KLConfig  # noqa: E402
from vaekit.training.standard import standard_callbacks  # noqa: E402

ARMS = {
    "a": ("beta=1 from step 0", {}, {}, {}),
    "b": ("linear warm-up", {"schedule": "linear", "warmup_epochs": None}, {}, {}),
    "c": ("cyclical annealing", {"schedule": "cyclical", "cycles": 4, "cycle_ratio": 0.5}, {}, {}),
    "d": ("free bits 0.5 nats/dim", {"free_bits": 0.5}, {}, {}),
    "e": ("decoder-input dropout", {}, {}, {}),
    "f": ("recover (free bits on)", {}, {}, {"on_collapse": "recover", "recover_action": "free_bits"}),
    "g": ("capacity annealing", {"schedule": "capacity"}, {}, {}),
    "h": ("total-KL floor", {"kl_floor": None}, {}, {}),
}


def model_config(args, **extra) -> VAEConfig:
    return VAEConfig(latent_dim=args.latent, architecture="conv", conv_channels=(32, 64), hidden_sizes=(256,),
                     decoder="pixelcnn", pixelcnn_channels=args.channels, pixelcnn_layers=args.layers,
                     pixelcnn_dilation_cycle=args.dilation_cycle, pixelcnn_full_context=args.full_context,
                     pixelcnn_full_context_layers=args.full_context_layers,
                     pixelcnn_cond_grid=args.cond_grid, **extra)


def run_arm(key: str, args, data, root: Path) -> dict:
    label, kl_kw, model_kw, mon_kw = ARMS[key]
    if kl_kw.get("schedule") == "linear":
        kl_kw = {"schedule": "linear", "warmup_steps": max(1, round(args.steps * args.warmup_fraction))}
    if kl_kw.get("schedule") == "capacity":
        kl_kw = {"schedule": "capacity", "capacity_max": args.capacity, "capacity_steps": args.steps,
                 "capacity_gamma": args.gamma}
    if "kl_floor" in kl_kw:
        kl_kw = {"kl_floor": args.kl_floor}
        label = f"{label} {args.kl_floor:g} nats"
    if key == "e":
        model_kw = {"decoder_dropout": args.dropout}
        label = f"{label} p={args.dropout}"
    torch.manual_seed(0)
    model = VAE(model_config(args, **model_kw))
    mon = MonitorConfig(every_steps=args.check_every, samples=1000, patience=args.patience,
                        kl_threshold=args.kl_threshold, min_active_units=args.min_au, **mon_kw)
    cfg = TrainConfig(epochs=100, max_steps=args.steps, batch_size=args.batch, lr=args.lr, progress=False,
                      tensorboard="off", checkpoint_every=args.check_every, eval_batch_size=500, seed=0,
                      threads=args.threads)
    run_dir = root / f"arm-{key}"
    t = time.perf_counter()
    dc = DataConfig(binarize="dynamic")
    callbacks = standard_callbacks(model, data, data=dc, kl=KLConfig(**kl_kw), monitor=mon, seed=cfg.seed)
    res = Trainer(model, data, cfg, data_config=dc, run_dir=run_dir, callbacks=callbacks).fit(resume=False)
    wall = time.perf_counter() - t
    log = read_metrics(run_dir / "metrics.jsonl")
    monitor = [r for r in log if r["type"] == "monitor"]
    last = monitor[-1]
    collapse = [r for r in log if r["type"] == "event" and r.get("event") == "collapse"]
    recover = [r for r in log if r["type"] == "event" and r.get("event") == "recover"]
    ev = res.final_eval or {}
    return {
        "arm": key, "label": label, "steps": res.steps, "wall_s": wall,
        "test_kl": ev.get("kl"), "test_neg_elbo": ev.get("neg_elbo"), "test_recon": ev.get("recon"),
        "au": last["au"], "mi": last["mi"], "latent_step": last["step"],
        "detector_fired": bool(collapse), "first_alert_step": collapse[0]["step"] if collapse else None,
        "alerts": [{k: e[k] for k in ("cause", "step", "onset", "action")} for e in collapse],
        "recoveries": [{k: e[k] for k in ("step", "from_checkpoint", "change")} for e in recover],
        "trajectory": [{"step": r["step"], "au": r["au"], "mi": r["mi"]} for r in monitor],
        "monitor_seconds": sum(r["seconds"] for r in monitor),
        "monitor_overhead": sum(r["seconds"] for r in monitor) / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps per arm")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--channels", type=int, default=16, help="PixelCNN channels")
    ap.add_argument("--layers", type=int, default=4, help="PixelCNN masked 3x3 layers")
    ap.add_argument("--dilation-cycle", type=int, default=4, help="dilations 1,2,4,.. repeat every N layers")
    ap.add_argument("--full-context", type=int, default=2000,
                    help="PixelCNN: hidden units of the MADE term that sees all earlier pixels (0: off)")
    ap.add_argument("--cond-grid", type=int, default=1,
                    help="PixelCNN: z enters as a bias map of this size (1: per channel; 28: per pixel)")
    ap.add_argument("--full-context-layers", type=int, default=1, help="hidden layers of that MADE term")
    ap.add_argument("--warmup-fraction", type=float, default=1.0, help="arm b: warm-up length / budget")
    ap.add_argument("--capacity", type=float, default=10.0, help="arm g: C_max, nats")
    ap.add_argument("--gamma", type=float, default=100.0, help="arm g: capacity weight gamma")
    ap.add_argument("--kl-floor", type=float, default=8.0, help="arm h: total-KL target, nats")
    ap.add_argument("--dropout", type=float, default=0.5, help="arm e: decoder-input dropout probability")
    ap.add_argument("--patience", type=int, default=100, help="KL alert: consecutive low steps")
    # the definition of a collapsed run is KL < 0.5 nats and AU <= 1: the detector uses it
    ap.add_argument("--kl-threshold", type=float, default=0.5, help="KL alert threshold, nats")
    ap.add_argument("--min-au", type=int, default=2, help="latent alert when fewer units are active")
    ap.add_argument("--check-every", type=int, default=100, help="AU/MI check and checkpoint every N steps")
    ap.add_argument("--name", default="collapse", help="results file: bench/results/<name>.json")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (1 is fastest on a busy machine)")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other arms of an existing results file made with the same settings")
    args = ap.parse_args()
    data = load_dataset("mnist")
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        for key in args.arms:
            r = run_arm(key, args, data, root)
            results.append(r)
            fired = f"yes @ {r['first_alert_step']}" if r["detector_fired"] else "no"
            rows.append([key, r["label"], r["test_kl"], r["au"], r["mi"], r["test_neg_elbo"], fired,
                         len(r["recoveries"]), r["wall_s"], f"{100 * r['monitor_overhead']:.1f}%"])
            print(f"arm {key} done: KL {r['test_kl']:.3f} AU {r['au']} MI {r['mi']:.3f} "
                  f"-ELBO {r['test_neg_elbo']:.2f} fired={fired} ({r['wall_s']:.0f} s)", flush=True)
    print_table(["arm", "setting", "test KL", "AU", "MI", "test -ELBO", "detector", "recoveries", "time s",
                 "AU/MI checks"], rows)
    if args.merge:
        results = merge_arms(args, results)
    write_results(args.name, {"setup": vars(args), "arms": results})


def merge_arms(args, results: list[dict]) -> list[dict]:
    """The arms of bench/results/<name>.json not rerun here, plus these; refuses other settings."""
    path = RESULTS / f"{args.name}.json"
    if not path.is_file():
        return results
    old = json.loads(path.read_text())
    ignore = {"arms", "name", "out", "merge", "threads"}
    mine = {k: v for k, v in vars(args).items() if k not in ignore}
    theirs = {k: v for k, v in old.get("setup", {}).items() if k not in ignore}
    if mine != theirs:
        diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        raise SystemExit(f"--merge: {path} was made with other settings ({', '.join(diff)}); rerun every arm")
    by_arm = {a["arm"]: a for a in old.get("arms", [])} | {a["arm"]: a for a in results}
    return [by_arm[k] for k in sorted(by_arm)]


if __name__ == "__main__":
    main()
