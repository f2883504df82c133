"""Drift detectors on real data: false-alarm rate, power, delay and cost (issue 12).

Two VAEs (MLP, D = 16, Bernoulli likelihood), one on MNIST and one on Fashion-MNIST, each trained
for a fixed wall-time budget with the library's Trainer on every class but the last (digit 9,
"Ankle boot"), so that class is new to the model. Models are cached under runs/bench-drift.

Held-out images (10,000 drawn from the training split and never trained on, plus the test split,
known classes only) are shuffled once and cut into a reference (2,000) and a disjoint pool the
windows are drawn from. Per detector:

* false-alarm rate: share of >= 200 no-drift windows (``--window`` images drawn from the pool)
  that raise an alarm at alpha = 0.01;
* power: share of drifted windows that raise an alarm, per scenario (new class at 5/15/30 % of
  traffic, 3 % all-black images, Gaussian noise sigma 0.1 / 0.3, brightness +0.2, rotation 30
  degrees, the other dataset);
* delay: requests until the first alarm in a stream of drifted requests, the detector scoring the
  last ``--window`` requests every ``--step`` requests (the first score after ``--window``);
* cost: mean wall time of one ``score`` per detector.

    python bench/drift.py               # the full run (trains the two models once, ~3 min each)
    python bench/drift.py --quick       # smoke run: tiny training budget, few windows
    python bench/drift.py --mmd-draws 4  # MMD's FAR per reference and subsample, added to the results

torch.set_num_threads(1) throughout (the CPU is shared); figures are measured with one thread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, print_table, train_run, write_results  # noqa: E402

from vaekit import VAEConfig, load_dataset  # noqa: E402
from vaekit.atomic import atomic_write_bytes  # noqa: E402
from vaekit.data import ImageDataset, ImageSplit  # noqa: E402
from vaekit.monitoring.detectors import KSDetector, default_detectors  # noqa: E402
from vaekit.monitoring.gate import QualityGate  # noqa: E402
from vaekit.monitoring.reference import Window, reference_from_arrays, window_from_inspection  # noqa: E402
from vaekit.training import DataConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "bench-drift"
DATASETS = ("mnist", "fashion-mnist")
NEW_CLASS = 9  # the last class of each dataset (digit 9, "Ankle boot") is left out of training
ALPHA = 0.01


def known_only(split: ImageSplit, new_class: int) -> ImageSplit:
    keep = split.labels != new_class
    return ImageSplit(split.images[keep], split.labels[keep])


def prepare(name: str, new_class: int, held: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Training set (known classes), held-out known images, new-class images, all uint8."""
    data = load_dataset(name)
    train_known = known_only(data.train, new_class)
    rest, held_out = train_known.split_off(held, seed=seed)
    test_known = known_only(data.test, new_class)
    new_imgs = torch.cat([data.train.images[data.train.labels == new_class],
                          data.test.images[data.test.labels == new_class]])
    pool = torch.cat([held_out.images, test_known.images])
    pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed + 1))]
    return {"train": ImageDataset(name, rest, test_known, data.classes, data.provenance),
            "held_out": pool, "new_class": new_imgs, "class_name": data.classes[new_class],
            "test": data.test}


def train_models(args) -> dict[str, Any]:
    out = {}
    for name in DATASETS:
        prep = prepare(name, new_class=NEW_CLASS)
        cfg = VAEConfig(latent_dim=args.latent, architecture="mlp", hidden_sizes=(400,), likelihood="bernoulli")
        run_dir = RUNS / (f"quick-{name}" if args.quick else name)
        targs = SimpleNamespace(reuse=not args.retrain, threads=1)
        print(f"== {name}: train (or reuse) {run_dir}", flush=True)
        model, info = train_run(run_dir, cfg, prep["train"], DataConfig(dataset=name), targs,
                                seconds=args.train_seconds)
        print(f"   {info}", flush=True)
        out[name] = {"model": model.eval(), "info": info, **prep}
    return out


# -- per-image statistics and drifted images ----------------------------------------------------------
FIELDS = ("latent", "logvar", "recon_mse", "recon_nats", "kl", "latent_norm", "pixel_mean", "pixel_var")


@torch.no_grad()
def image_stats(model, x: torch.Tensor, batch: int = 1000) -> dict[str, np.ndarray]:
    """model.inspect of x (N, C, H, W) in [0, 1] plus pixel statistics: one row per image."""
    parts: dict[str, list] = {f: [] for f in FIELDS}
    for i in range(0, x.shape[0], batch):
        xb = x[i: i + batch]
        w = window_from_inspection(model.inspect(xb), xb)
        for f in FIELDS:
            parts[f].append(getattr(w, f))
    return {f: np.concatenate(v) for f, v in parts.items()}


def add_noise(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate images (N, C, H, W) about their centre (bilinear, zero fill)."""
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)


# scenario -> (source of the drifted images, share of traffic)
SCENARIOS = {
    "new_class_5": ("new_class", 0.05), "new_class_15": ("new_class", 0.15), "new_class_30": ("new_class", 0.30),
    "black_3": ("black", 0.03), "noise_0.1": ("noise_0.1", 1.0), "noise_0.3": ("noise_0.3", 1.0),
    "brightness_0.2": ("brightness_0.2", 1.0), "rotation_30": ("rotation_30", 1.0),
    "other_dataset": ("other_dataset", 1.0),
}


def build_sources(model, pool: torch.Tensor, new_class: torch.Tensor, other: torch.Tensor) -> dict[str, torch.Tensor]:
    """Images of every drift source; corruptions are applied to the window pool's own images."""
    return {"clean": pool, "new_class": new_class, "black": torch.zeros(1, *pool.shape[1:]),
            "noise_0.1": add_noise(pool, 0.1, 1), "noise_0.3": add_noise(pool, 0.3, 2),
            "brightness_0.2": (pool + 0.2).clamp(0, 1), "rotation_30": rotate(pool, 30.0),
            "other_dataset": other}


def bench_detectors() -> dict[str, Any]:
    """The default detectors and the latent KS test with the DKW margin (not a default: see KSDetector)."""
    return {**default_detectors(alpha=ALPHA),
            "ks_latent_margin": KSDetector(alpha=ALPHA, confidence=0.99, name="ks_latent_margin")}


def take(stats: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {f: v[idx] for f, v in stats.items()}


def make_window(parts: list[dict[str, np.ndarray]], period_s: float = 300.0) -> Window:
    """A Window from row blocks; requests spread evenly over the last ``period_s`` (one rolling period)."""
    arrays = {f: np.concatenate([p[f] for p in parts]) for f in FIELDS}
    n = arrays["recon_mse"].shape[0]
    return Window(**arrays, timestamps=np.linspace(0.0, period_s, n))


def drifted_rows(rng: np.random.Generator, stats: dict[str, dict[str, np.ndarray]], source: str, share: float,
                 n: int, exact: bool = True) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """(clean rows, drifted rows, drifted count) for ``n`` requests with ``share`` of them drifted."""
    k = round(share * n) if exact else int(rng.binomial(n, share))
    clean = take(stats["clean"], rng.choice(len(stats["clean"]["recon_mse"]), n - k, replace=False))
    src = stats[source]
    m = len(src["recon_mse"])
    drift = take(src, rng.choice(m, k, replace=k > m))  # one all-black image, repeated
    return clean, drift, k


def score_all(detectors: dict[str, Any], window: Window, cost: dict[str, list[float]] | None = None) -> dict[str, bool]:
    out = {}
    for name, det in detectors.items():
        t0 = time.perf_counter()
        out[name] = bool(det.score(window).drifted)
        if cost is not None:
            cost[name].append(time.perf_counter() - t0)
    return out


def stream_delay(detectors: dict[str, Any], rng: np.random.Generator, stats, source: str, share: float,
                 window: int, step: int, length: int) -> dict[str, int | None]:
    """Requests after the drift onset until each detector's first alarm (None: none within ``length``).

    The stream is ``window`` clean requests, then ``length`` requests each drifted with probability
    ``share``; each detector scores the last ``window`` requests every ``step`` requests after the onset.
    """
    clean = take(stats["clean"], rng.choice(len(stats["clean"]["recon_mse"]), window, replace=False))
    after_clean, after_drift, _ = drifted_rows(rng, stats, source, share, length, exact=False)
    after = {f: np.concatenate([after_clean[f], after_drift[f]]) for f in FIELDS}
    order = rng.permutation(length)
    rows = {f: np.concatenate([clean[f], after[f][order]]) for f in FIELDS}
    delay: dict[str, int | None] = {name: None for name in detectors}
    for end in range(window + step, window + length + 1, step):
        pending = {n: d for n, d in detectors.items() if delay[n] is None}
        if not pending:
            break
        w = make_window([{f: v[end - window: end] for f, v in rows.items()}])
        for name, fired in score_all(pending, w).items():
            if fired:
                delay[name] = end - window
    return delay


# -- Alibi Detect, side by side (bench only; BSL licence, never a dependency) -------------------------
ALIBI_WORKER = r"""
import json, sys, time
import numpy as np
from alibi_detect.cd import KSDrift, MMDDrift
import alibi_detect
data = np.load(sys.argv[1])
ref, ref_mmd, windows, mmd_mask = data["ref"], data["ref_mmd"], data["windows"], data["mmd_mask"]
ks = KSDrift(ref.astype(np.float32), p_val=0.01, correction="bonferroni")
mmd = MMDDrift(ref_mmd.astype(np.float32), backend="pytorch", p_val=0.01, n_permutations=200, device="cpu")
out = {"version": alibi_detect.__version__, "ks": [], "mmd": [], "ks_s": 0.0, "mmd_s": 0.0}
for w, with_mmd in zip(windows, mmd_mask):
    w = w.astype(np.float32)
    for key, det in (("ks", ks), ("mmd", mmd)):
        if key == "mmd" and not with_mmd:
            out[key].append(-1)  # not run: MMDDrift takes seconds per window
            continue
        t = time.perf_counter()
        out[key].append(int(det.predict(w)["data"]["is_drift"]))
        out[key + "_s"] += time.perf_counter() - t
json.dump(out, open(sys.argv[2], "w"))
"""


def run_alibi(python: str, ref: np.ndarray, ref_mmd: np.ndarray, windows: list[np.ndarray],
              mmd_mask: np.ndarray) -> dict[str, Any]:
    """KSDrift on every window and MMDDrift on the windows ``mmd_mask`` selects (``-1`` for the others) of
    Alibi Detect, on the same latent windows, in its own interpreter."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.json"
        np.savez(src, ref=ref, ref_mmd=ref_mmd, windows=np.stack(windows), mmd_mask=mmd_mask)
        proc = subprocess.run([python, "-c", ALIBI_WORKER, str(src), str(dst)], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, check=False)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
        return json.loads(dst.read_text())


# -- one dataset ---------------------------------------------------------------------------------------
def run_dataset(name: str, m: dict[str, Any], other: torch.Tensor, args) -> dict[str, Any]:
    model = m["model"]
    pool = m["held_out"].float() / 255.0
    n_ref, n_gate = 2000, 3000
    ref_imgs, gate_imgs, win_imgs = pool[:n_ref], pool[n_ref:n_ref + n_gate], pool[n_ref + n_gate:]
    t0 = time.perf_counter()
    sources = build_sources(model, win_imgs, m["new_class"].float() / 255.0, other)
    stats = {k: image_stats(model, v) for k, v in sources.items()}
    ref_stats = image_stats(model, ref_imgs)
    prep_s = time.perf_counter() - t0
    reference = reference_from_arrays(**ref_stats)
    detectors = {k: d.fit(reference) for k, d in bench_detectors().items()}
    gate = QualityGate(tuple(pool.shape[1:])).fit(ref_imgs, gate_imgs)
    gate_rejects = {k: float(1 - gate.check(v).accepted.mean()) for k, v in sources.items()}
    rng = np.random.default_rng(0)
    W = args.window
    cost: dict[str, list[float]] = {k: [] for k in detectors}

    far_alarms: dict[str, int] = dict.fromkeys(detectors, 0)
    alibi_windows: list[np.ndarray] = []  # the first --alibi-windows of each kind (its MMD is slow)
    na = min(args.alibi_windows, args.far_windows)
    nap = min(args.alibi_windows // 10, args.power_windows)
    print(f"   {name}: {args.far_windows} no-drift windows of {W}", flush=True)
    for _ in range(args.far_windows):
        clean, _, _ = drifted_rows(rng, stats, "clean", 0.0, W)
        w = make_window([clean])
        if len(alibi_windows) < na:
            alibi_windows.append(w.latent)
        for k, fired in score_all(detectors, w, cost).items():
            far_alarms[k] += fired
    far = {k: v / args.far_windows for k, v in far_alarms.items()}

    power: dict[str, dict[str, float]] = {}
    for sc, (source, share) in SCENARIOS.items():
        hits = dict.fromkeys(detectors, 0)
        for i in range(args.power_windows):
            clean, drift, _ = drifted_rows(rng, stats, source, share, W)
            w = make_window([clean, drift])
            if i < nap:
                alibi_windows.append(w.latent)
            for k, fired in score_all(detectors, w).items():
                hits[k] += fired
        power[sc] = {k: v / args.power_windows for k, v in hits.items()}
        print(f"   {name}: power {sc} done", flush=True)

    delays: dict[str, dict[str, Any]] = {}
    for sc, (source, share) in SCENARIOS.items():
        runs = [stream_delay(detectors, rng, stats, source, share, W, args.step, args.stream)
                for _ in range(args.streams)]
        delays[sc] = {k: {"median": _median([r[k] for r in runs]), "runs": [r[k] for r in runs]} for k in detectors}
        print(f"   {name}: delay {sc} done", flush=True)

    alibi: dict[str, Any] = {"skipped": "no --alibi-python interpreter"}
    if args.alibi_python and Path(args.alibi_python).exists():
        print(f"   {name}: Alibi Detect on the same {len(alibi_windows)} windows", flush=True)
        # MMDDrift on the first --alibi-mmd-windows no-drift windows and a tenth of that per scenario
        nm, nmp = min(args.alibi_mmd_windows, na), min(max(1, args.alibi_mmd_windows // 10), nap)
        mask = np.zeros(len(alibi_windows), dtype=bool)
        mask[:nm] = True
        for i in range(len(SCENARIOS)):
            mask[na + i * nap: na + i * nap + nmp] = True
        res = run_alibi(args.alibi_python, ref_stats["latent"], detectors["mmd_latent"].reference_.numpy(),
                        alibi_windows, mask)
        alibi = res if "error" in res else alibi_summary(res, na, nap, nm, nmp)
    # why the brief's fixed rules fire with no drift: the reference itself, scored by them
    ref_window = make_window([ref_stats])
    fixed_moments = detectors["moments_fixed"].score(ref_window)
    reference_facts = {
        "q(z) mean": fixed_moments.details["mean"], "q(z) var": fixed_moments.details["var"],
        "dims breaking |mean| <= 0.1 or var >= 0.8": fixed_moments.details["flagged"],
        "share with ||z|| > 5": float((ref_stats["latent_norm"] > 5).mean()),
        "latent_norm p50/p99": [float(np.quantile(ref_stats["latent_norm"], q)) for q in (0.5, 0.99)],
    }
    return {
        "model": m["info"], "new_class": m["class_name"], "other_dataset": other_name(name),
        "reference_facts": reference_facts,
        "sizes": {"reference": n_ref, "gate_calibration": n_gate, "window_pool": len(win_imgs),
                  "new_class_images": len(m["new_class"]), "window": W, "step": args.step, "stream": args.stream},
        "prep_s": round(prep_s, 1), "far": far, "far_windows": args.far_windows,
        "far_upper95": {k: _upper95(far_alarms[k], args.far_windows) for k in detectors},
        "power": power, "power_windows": args.power_windows, "delay": delays, "streams": args.streams,
        "cost_ms": {k: 1000 * float(np.mean(v)) for k, v in cost.items()},
        "gate": {"hist_threshold": gate.hist_threshold_, "rejected_share": gate_rejects},
        "alibi": alibi,
    }


def alibi_summary(res: dict[str, Any], na: int, nap: int, nm: int, nmp: int) -> dict[str, Any]:
    """Rates and costs of Alibi Detect's answers: the first ``na`` windows are no-drift ones, then ``nap``
    per scenario; MMDDrift ran on the first ``nm`` and ``nmp`` of those."""
    ks, mmd = np.asarray(res["ks"]), np.asarray(res["mmd"])
    out: dict[str, Any] = {
        "version": res["version"],
        "windows": {"KSDrift": {"far": na, "power": nap}, "MMDDrift": {"far": nm, "power": nmp}},
        "far": {"KSDrift": float(ks[:na].mean()), "MMDDrift": float(mmd[:nm].mean())},
        "far_upper95": {"KSDrift": _upper95(int(ks[:na].sum()), na), "MMDDrift": _upper95(int(mmd[:nm].sum()), nm)},
        "power": {},
        "cost_ms": {"KSDrift": 1000 * res["ks_s"] / len(ks), "MMDDrift": 1000 * res["mmd_s"] / int((mmd >= 0).sum())}}
    for i, sc in enumerate(SCENARIOS):
        lo = na + i * nap
        out["power"][sc] = {"KSDrift": float(ks[lo: lo + nap].mean()), "MMDDrift": float(mmd[lo: lo + nmp].mean())}
    return out


def mmd_reference_draws(name: str, m: dict[str, Any], draws: int, args) -> dict[str, Any]:
    """MMD's no-drift FAR for one reference at a time, on the same no-drift windows as the main run (the same
    rng stream): reference A (the main run's 2,000 images) and B (the gate's calibration images, 2,000 of them,
    also disjoint from the windows); per reference ``draws`` 500-row subsamples with the plain permutation test
    (MMDDetector(n_reference=500, confidence=None), the detector before the margin), all 2,000 rows plain, and
    the default (all rows, confidence 0.99). How much of a FAR above alpha is the one reference drawn."""
    from vaekit.monitoring.detectors import MMDDetector

    pool = m["held_out"].float() / 255.0
    win_stats = {"clean": image_stats(m["model"], pool[5000:])}
    windows = [make_window([drifted_rows(rng, win_stats, "clean", 0.0, args.window)[0]])
               for rng in [np.random.default_rng(0)] for _ in range(args.far_windows)]
    configs = [(f"n500_plain_seed{s}", {"n_reference": 500, "confidence": None, "seed": s}) for s in range(draws)]
    configs += [("n2000_plain", {"confidence": None}), ("default", {})]
    out: dict[str, Any] = {}
    for ref_name, rows in (("A", slice(0, 2000)), ("B", slice(2000, 4000))):
        reference = reference_from_arrays(**image_stats(m["model"], pool[rows]))
        for key, kw in configs:
            det = MMDDetector(alpha=ALPHA, **kw).fit(reference)
            alarms = sum(det.score(w).drifted for w in windows)
            out[f"{ref_name}/{key}"] = {"far": alarms / len(windows), "alarms": alarms}
            print(f"   {name}: MMD reference {ref_name} {key}: {alarms} / {len(windows)}", flush=True)
    return {"windows": len(windows), "draws": out}


def reference_draws(name: str, m: dict[str, Any], draws: int, args) -> dict[str, Any]:
    """Every detector but MMD (see mmd_reference_draws) refitted on ``draws`` references, each 2,000 images
    drawn afresh from the held-out images, with ``--far-windows`` no-drift windows from the rest.

    A test at level alpha bounds the false-alarm rate averaged over the reference draw too; one reference
    is a fixed offset in every window (docs/monitoring.md), so its own rate lands above or below alpha. The
    mean over draws estimates the detector's rate; the spread is what one deployment may see."""
    held = image_stats(m["model"], m["held_out"].float() / 255.0)
    n = len(held["recon_mse"])
    alarms: dict[str, list[int]] = {}
    for d in range(draws):
        rng = np.random.default_rng([7, d])
        perm = rng.permutation(n)
        reference = reference_from_arrays(**take(held, perm[:2000]))
        dets = {k: v.fit(reference) for k, v in bench_detectors().items() if k != "mmd_latent"}
        rest = {"clean": take(held, perm[2000:])}
        counts = dict.fromkeys(dets, 0)
        for _ in range(args.far_windows):
            w = make_window([drifted_rows(rng, rest, "clean", 0.0, args.window)[0]])
            for k, fired in score_all(dets, w).items():
                counts[k] += fired
        for k, c in counts.items():
            alarms.setdefault(k, []).append(c)
        print(f"   {name}: reference draw {d}: ks_latent {counts['ks_latent']} / {args.far_windows}", flush=True)
    total = draws * args.far_windows
    return {"draws": draws, "windows_per_draw": args.far_windows, "reference": 2000,
            "far_per_draw": {k: [c / args.far_windows for c in v] for k, v in alarms.items()},
            "far": {k: sum(v) / total for k, v in alarms.items()},
            "far_upper95": {k: _upper95(sum(v), total) for k, v in alarms.items()}}


def other_name(name: str) -> str:
    return DATASETS[1 - DATASETS.index(name)]


def _median(values: list[int | None]) -> int | None:
    """Median delay with misses (None) counted as +infinity; None when half or more missed."""
    v = sorted(x if x is not None else math.inf for x in values)
    med = v[(len(v) - 1) // 2]
    return None if med == math.inf else int(med)


def _upper95(k: int, n: int) -> float:
    """Clopper-Pearson 95 % upper bound of a rate observed k times in n."""
    return 1.0 if k == n else float(stats.beta.ppf(0.975, k + 1, n - k))


def print_tables(results: dict[str, Any]) -> None:
    for name, r in results["datasets"].items():
        print(f"\n{name}: false-alarm rate (alpha {ALPHA}, {r['far_windows']} windows of {r['sizes']['window']}) "
              f"and power ({r['power_windows']} windows per scenario)")
        short = {"new_class_5": "new5", "new_class_15": "new15", "new_class_30": "new30", "black_3": "black3",
                 "noise_0.1": "noise.1", "noise_0.3": "noise.3", "brightness_0.2": "bright", "rotation_30": "rot30",
                 "other_dataset": "other"}
        headers = ["detector", "FAR", "FAR<=95%", *short.values(), "ms/window"]
        rows = []
        for det in r["far"]:
            rows.append([det, r["far"][det], r["far_upper95"][det], *(r["power"][sc][det] for sc in short),
                         r["cost_ms"][det]])
        if "far" in r["alibi"]:
            for det in ("KSDrift", "MMDDrift"):
                a = r["alibi"]
                rows.append([f"alibi {det}", a["far"][det], a["far_upper95"][det],
                             *(a["power"][sc][det] for sc in short), a["cost_ms"][det]])
        rows.append(["(gate rejects)", r["gate"]["rejected_share"]["clean"], "",
                     *(r["gate"]["rejected_share"][SCENARIOS[sc][0]] for sc in short), ""])
        print_table(headers, rows)
        print(f"\n{name}: median delay (requests after the onset until the alarm; '-' none within "
              f"{r['sizes']['stream']}; {r['streams']} streams, scored every {r['sizes']['step']})")
        rows = [[det, *("-" if r["delay"][sc][det]["median"] is None else r["delay"][sc][det]["median"]
                        for sc in short)] for det in r["far"]]
        print_table(["detector", *short.values()], rows)
        rd = results.get("reference_draws", {}).get(name)
        if rd:
            print(f"\n{name}: false-alarm rate over {rd['draws']} references of {rd['reference']} "
                  f"({rd['windows_per_draw']} windows each)")
            print_table(["detector", "FAR", "FAR<=95%", "min", "max"],
                        [[k, v, rd["far_upper95"][k], min(rd["far_per_draw"][k]), max(rd["far_per_draw"][k])]
                         for k, v in rd["far"].items()])


SHORT_MD = {"new_class_5": "new 5%", "new_class_15": "new 15%", "new_class_30": "new 30%", "black_3": "black 3%",
            "noise_0.1": "noise 0.1", "noise_0.3": "noise 0.3", "brightness_0.2": "bright +0.2",
            "rotation_30": "rot 30°", "other_dataset": "other set"}


def _md(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if v < 10 else f"{v:.1f}"
        return "–" if v is None else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


def markdown(results: dict[str, Any]) -> str:
    """The tables of docs/monitoring.md from a results file."""
    out = []
    for name, r in results["datasets"].items():
        out.append(f"**{name}** (new class: {r['new_class']}; FAR over {r['far_windows']} no-drift windows of "
                   f"{r['sizes']['window']}, power over {r['power_windows']} windows per scenario)\n")
        rows = [[det, r["far"][det], r["far_upper95"][det], *(r["power"][sc][det] for sc in SHORT_MD),
                 r["cost_ms"][det]] for det in r["far"]]
        a = r["alibi"]
        if "far" in a:
            rows += [[f"Alibi {det} ({a['windows'][det]['far']} / {a['windows'][det]['power']} windows)",
                      a["far"][det], a["far_upper95"][det], *(a["power"][sc][det] for sc in SHORT_MD),
                      a["cost_ms"][det]] for det in ("KSDrift", "MMDDrift")]
        g = r["gate"]["rejected_share"]
        rows.append(["*gate: share of drifted images rejected*", g["clean"], "",
                     *(g[SCENARIOS[sc][0]] for sc in SHORT_MD), ""])
        out.append(_md(["detector", "FAR", "FAR 95% upper", *SHORT_MD.values(), "ms/window"], rows))
        out.append(f"\nMedian delay, {name} (requests after the onset until the first alarm, {r['streams']} streams, "
                   f"scored every {r['sizes']['step']} on the last {r['sizes']['window']}; – = no alarm within "
                   f"{r['sizes']['stream']} in half the streams or more):\n")
        out.append(_md(["detector", *SHORT_MD.values()],
                       [[det, *(r["delay"][sc][det]["median"] for sc in SHORT_MD)] for det in r["far"]]))
        rd = results.get("reference_draws", {}).get(name)
        if rd:
            out.append(f"\nFAR of {name} over {rd['draws']} references of {rd['reference']} held-out images drawn "
                       f"afresh ({rd['windows_per_draw']} no-drift windows each; MMD: see above):\n")
            out.append(_md(["detector", "FAR, all draws", "95% upper", "lowest draw", "highest draw"],
                           [[k, v, rd["far_upper95"][k], min(rd["far_per_draw"][k]), max(rd["far_per_draw"][k])]
                            for k, v in rd["far"].items()]))
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny training budget, few windows")
    p.add_argument("--train-only", action="store_true", help="train (or reuse) the two models and stop")
    p.add_argument("--retrain", action="store_true", help="retrain even when a cached model exists")
    p.add_argument("--train-seconds", type=float, default=None, help="training wall-time budget per model")
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--window", type=int, default=500, help="requests per window")
    p.add_argument("--far-windows", type=int, default=None, help="no-drift windows (default 400; quick 20)")
    p.add_argument("--power-windows", type=int, default=None, help="drifted windows per scenario (40; quick 4)")
    p.add_argument("--streams", type=int, default=None, help="delay streams per scenario (5; quick 1)")
    p.add_argument("--step", type=int, default=100, help="requests between scores in a delay stream")
    p.add_argument("--stream", type=int, default=None, help="drifted requests per stream (3000; quick 600)")
    p.add_argument("--alibi-python", default=os.environ.get("VAEKIT_ALIBI_PYTHON", "/tmp/alibi-venv/bin/python"),
                   help="an interpreter with alibi-detect installed (kept out of vaekit's environment)")
    p.add_argument("--alibi-windows", type=int, default=200,
                   help="no-drift windows given to Alibi Detect too (and a tenth of it per scenario)")
    p.add_argument("--alibi-mmd-windows", type=int, default=30,
                   help="no-drift windows MMDDrift scores (and a tenth of it per scenario): it takes seconds each")
    p.add_argument("--reference-draws", type=int, default=None,
                   help="references drawn afresh for the FAR of every detector but MMD (default 10; quick 2)")
    p.add_argument("--mmd-draws", type=int, default=0,
                   help="only measure MMD's FAR per reference (2 references, this many 500-row subsamples each, "
                        "all rows, the default margin); adds it to the results file")
    p.add_argument("--out", default="drift", help="results name under bench/results (quick: drift-quick)")
    p.add_argument("--markdown", action="store_true", help="print the results file's tables as markdown and stop")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads((RESULTS / f"{args.out}.json").read_text())))
        return 0
    torch.set_num_threads(1)  # the CPU is shared: every figure is measured on one thread
    q = args.quick
    args.train_seconds = args.train_seconds or (10.0 if q else 180.0)
    args.far_windows = args.far_windows or (20 if q else 400)
    args.power_windows = args.power_windows or (4 if q else 40)
    args.streams = args.streams or (1 if q else 5)
    args.stream = args.stream or (600 if q else 3000)
    args.reference_draws = args.reference_draws if args.reference_draws is not None else (2 if q else 10)
    if q and args.out == "drift":
        args.out = "drift-quick"
    models = train_models(args)
    if args.train_only:
        return 0
    if args.mmd_draws:
        path = RESULTS / f"{args.out}.json"
        results = json.loads(path.read_text())
        results["mmd_reference_draws"] = {name: mmd_reference_draws(name, models[name], args.mmd_draws, args)
                                          for name in DATASETS}
        atomic_write_bytes(path, (json.dumps(results, indent=2) + "\n").encode())
        print(f"updated {path}")
        return 0
    results: dict[str, Any] = {"alpha": ALPHA, "torch_threads": 1, "quick": q, "datasets": {}}
    for name in DATASETS:
        other = models[other_name(name)]["test"].images.float() / 255.0
        results["datasets"][name] = run_dataset(name, models[name], other, args)
    if args.reference_draws:
        results["reference_draws"] = {name: reference_draws(name, models[name], args.reference_draws, args)
                                      for name in DATASETS}
    brief = {}
    for name, r in results["datasets"].items():
        d = r["delay"]["new_class_15"]["ks_latent"]
        brief[name] = {"median_delay": d["median"], "runs": d["runs"],
                       "within_1000": all(x is not None and x <= 1000 for x in d["runs"])}
    results["brief_case"] = {"scenario": "new class at 15 % of traffic, latent KS (Bonferroni, alpha 0.01)",
                             **brief}
    print_tables(results)
    print(f"\nbrief's case (15 % new class, latent KS within 1,000 requests): {brief}")
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
