"""The brief's incident, replayed end to end on real data with vaekit's own pieces.

A VAE trained on Fashion-MNIST without one class (the "new line", ``--new-class``, default 7:
sneakers) is registered with a reference profile and served as ``fashion@production`` with the
data-quality gate and a record store. A traffic generator streams held-out test images; at
request ``--drift-at`` 15% of the traffic becomes the new class and 3% all-black images (the
corrupted JPEGs). The service's request capture (``--capture-share``, here every accepted
production request by default, so that a short drift phase yields enough images) keeps what it
served as shards indexed in the store. The monitor (its own object, as ``vaekit monitor run``
would run it) scores the store every ``--check-every`` requests. Then an emergency retrain on the
images captured since the drift started (selected through the store's capture index) goes
through the pipeline (validation quarantines the black images, the benchmark suite gates
the candidate on the old and the new distribution), becomes the canary at 5% of traffic, and the
canary decision promotes it. A second candidate, deliberately degraded (noise on its decoder),
is put in canary and rolled back by the same decision. Every alias move is in the registry's
history with its reason.

    python bench/incident.py            # about 5 minutes on 2 cores
    python bench/incident.py --quick    # about 2.5 minutes: smaller model, fewer requests
    python bench/incident.py --tiny     # well under a minute: the default test suite's replay

Prints the timeline, saves it as bench/results/incident.png and writes bench/results/incident.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, print_table, write_results  # noqa: E402

from vaekit.data import ImageDataset, load_dataset  # noqa: E402
from vaekit.data.dataset import ImageSplit  # noqa: E402
from vaekit.deploy import CanaryPolicy, RoutingPolicy, Window, apply_decision, decide, start_canary  # noqa: E402
from vaekit.deploy.pipelines import PipelineConfig, run_pipeline  # noqa: E402
from vaekit.deploy.suite import SuitePolicy  # noqa: E402
from vaekit.monitoring.monitor import Monitor  # noqa: E402
from vaekit.monitoring.store import RecordStore  # noqa: E402
from vaekit.registry import ModelRegistry  # noqa: E402
from vaekit.serving.capture import Capture  # noqa: E402
from vaekit.serving.service import ModelService  # noqa: E402
from vaekit.training.config import load_run_config  # noqa: E402
from vaekit.training.run import train  # noqa: E402


def without(split: ImageSplit, cls: int) -> ImageSplit:
    keep = split.labels != cls
    return ImageSplit(split.images[keep], split.labels[keep])


def only(split: ImageSplit, cls: int) -> ImageSplit:
    keep = split.labels == cls
    return ImageSplit(split.images[keep], split.labels[keep])


class Traffic:
    """Serves requests of one image through the service and keeps the timeline figures."""

    def __init__(self, svc: ModelService, monitor: Monitor, check_every: int, window_requests: int | None = None):
        self.svc, self.monitor, self.check_every = svc, monitor, check_every
        self.window_requests = window_requests  # score the last N requests (None: the monitor's window_s)
        self.sent_at: list[float] = []  # Unix time of each request
        self.n = 0
        self.rejected = 0
        self.black_sent = 0  # all-black images sent, and how many of them the gate refused
        self.black_rejected = 0
        self.rejected_by_phase: dict[str, int] = {}
        self.timeline: list[dict[str, Any]] = []
        self.alerts: list[dict[str, Any]] = []
        self.window_mse: list[float] = []
        self.moves: list[dict[str, Any]] = []  # alias moves by the canary decision, at which request

    def send(self, x: torch.Tensor, phase: str) -> None:
        from vaekit.serving.service import GateRejectedError

        self.n += 1
        self.sent_at.append(time.time())
        black = not bool(x.any())
        self.black_sent += black
        try:
            res = self.svc.score(x[None], request_id=f"r{self.n}")
            self.window_mse.append(float(res.stats.recon_mse[0]))
        except GateRejectedError:
            self.rejected += 1
            self.black_rejected += black
            self.rejected_by_phase[phase] = self.rejected_by_phase.get(phase, 0) + 1
        if self.n % self.check_every == 0:
            self.check(phase)

    def check(self, phase: str) -> None:
        self.svc.flush_records()
        now = time.time()
        if self.window_requests is not None:  # a window of the last N requests, however fast they came
            first = self.sent_at[max(0, len(self.sent_at) - self.window_requests)]
            self.monitor.window_s = now - first + 1e-3
        it = self.monitor.run_once(now)
        ks = [g.results.get("ks_latent") for g in it.groups if g.route == "production" and g.results]
        p = ks[0].p_value if ks and ks[0] is not None else None
        firing = sorted({e.rule for e in it.events if e.status == "firing"})
        self.alerts += [{"request": self.n, "rule": e.rule, "status": e.status, "version": e.version}
                        for e in it.events]
        self.timeline.append({"request": self.n, "phase": phase, "recon_mse": float(np.mean(self.window_mse))
                              if self.window_mse else None, "ks_p": p, "firing": firing, "rejected": self.rejected})
        self.window_mse = []


def stream(traffic: Traffic, pool: ImageSplit, new: ImageSplit | None, n: int, rng: np.random.Generator,
           phase: str, new_share: float = 0.15, black_share: float = 0.03) -> None:
    for _ in range(n):
        u = rng.random()
        if new is not None and u < black_share:
            x = torch.zeros(1, 28, 28)
        elif new is not None and u < black_share + new_share:
            x = new.images[rng.integers(len(new))].float() / 255
        else:
            x = pool.images[rng.integers(len(pool))].float() / 255
        traffic.send(x, phase)


def canary_round(reg: ModelRegistry, store: RecordStore, svc: ModelService, traffic: Traffic, pool: ImageSplit,
                 new: ImageSplit, chunk: int, max_requests: int, rng: np.random.Generator, policy: CanaryPolicy,
                 phase: str):
    """Traffic with the canary set, decided every ``chunk`` requests on the store's windows (as a monitor
    would), until the decision is not ``hold`` or ``max_requests`` have passed; then applied through the
    registry. Returns (decision, production requests, canary requests)."""
    svc.reload()
    t0 = time.time()
    aliases = reg.aliases("fashion")
    sent = 0
    while True:
        stream(traffic, pool, new, chunk, rng, phase, black_share=0.0)
        sent += chunk
        svc.flush_records()
        rows = store.rows("fashion", start=t0, accepted=True)
        prod = [r["recon_mse"] for r in rows if r["route"] == "production"
                and r["version"] == str(aliases["production"])]
        can = [r["recon_mse"] for r in rows if r["route"] == "canary" and r["version"] == str(aliases["canary"])]
        d = decide(Window(np.array(prod), duration_s=time.time() - t0, version=aliases["production"]),
                   Window(np.array(can), duration_s=time.time() - t0, version=aliases["canary"]), policy)
        if d.action != "hold" or sent >= max_requests:
            break
    apply_decision(reg, "fashion", d, actor="incident-replay")
    traffic.moves.append({"request": traffic.n, "action": d.action})
    svc.reload()
    return d, len(prod), len(can)


# per preset: requests before / after the drift, at most per canary round, monitor and decision cadence, the
# production run (epochs, training subset, hidden width), the retrain's epochs, suite examples, monitor minimum,
# canary requests before a decision may promote, the degraded candidate's decoder noise, the canary's share, and
# the monitor's cadence while a canary runs, and its window in requests (None: the last 6 s, whatever the rate)
PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(normal=2000, drift=3000, canary_max=40000, check_every=500, chunk=1000, epochs=5, subset=None,
                 hidden=256, retrain_epochs=5, examples=2000, min_requests=150, canary_min=100, noise=0.05,
                 canary_share=0.05, canary_check_every=500, window_requests=None),
    "quick": dict(normal=1000, drift=1500, canary_max=16000, check_every=250, chunk=1000, epochs=2, subset=20000,
                  hidden=256, retrain_epochs=3, examples=2000, min_requests=150, canary_min=100, noise=0.05,
                  canary_share=0.05, canary_check_every=250, window_requests=None),
    "tiny": dict(normal=300, drift=700, canary_max=8000, check_every=100, chunk=500, epochs=1, subset=6000,
                 hidden=128, retrain_epochs=2, examples=500, min_requests=80, canary_min=50, noise=0.1,
                 canary_share=0.1, canary_check_every=500, window_requests=300),
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller model, fewer requests (about 2.5 minutes)")
    size.add_argument("--tiny", action="store_true", help="the smallest replay (the default test suite's)")
    ap.add_argument("--new-class", type=int, default=7)
    ap.add_argument("--out", default="runs/incident")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--capture-share", type=float, default=1.0,
                    help="share of accepted production requests the service captures (default 1: every one)")
    ap.add_argument("--results", help="folder for incident.json and incident.png (default: bench/results)")
    return ap.parse_args()


def production(args: argparse.Namespace, P: dict[str, Any], out: Path, ds: ImageDataset, old: ImageDataset):
    """Train the production model without the new line, register it with a profile; returns the registry."""
    cfg = load_run_config(None, ["name=prod", f"out_dir={out / 'runs'}", f"train.epochs={P['epochs']}",
                                 f"data.dataset={ds.name}", f"model.hidden_sizes=[{P['hidden']}]",
                                 "model.latent_dim=16", "train.progress=false", "train.tensorboard=off",
                                 "train.checkpoint_every=0", f"train.threads={args.threads}"]
                          + ([f"data.train_subset={P['subset']}"] if P["subset"] else []))
    train(cfg, dataset=old)
    reg = ModelRegistry(f"sqlite:///{out / 'registry' / 'registry.db'}", actor="incident@bench")
    reg.register(cfg.run_dir, "fashion", alias="production", reason="trained without the new line",
                 profile_images=old.test.images[:3000].float() / 255, data_fingerprint="fashion-mnist minus class")
    return reg


def degraded_canary(reg: ModelRegistry, out: Path, noise: float) -> None:
    """A deliberately degraded candidate (Gaussian noise of std ``noise`` on the production decoder's
    weights) put in canary."""
    bad = reg.load("fashion@production")
    with torch.no_grad():
        for p in bad.decoder.parameters():
            p.add_(noise * torch.randn_like(p))
    bad.save(out / "degraded")
    ver = reg.register(out / "degraded", "fashion", parent="fashion@production", profile=False,
                       description="deliberately degraded (decoder noise) to show the rollback")
    start_canary(reg, "fashion", ver.version, "a degraded candidate, to show the rollback")


def normal_then_drift(svc: ModelService, traffic: Traffic, pool: ImageSplit, new: ImageSplit, P: dict[str, Any],
                      rng: np.random.Generator) -> tuple[int, float, float]:
    """Normal traffic, then the drift (15% the new line, 3% all-black images), with a capture shard
    boundary at the drift; returns (requests before the drift, its Unix time, the drift's end)."""
    stream(traffic, pool, None, P["normal"], rng, "normal")
    svc.flush_capture()  # a shard boundary at the drift, so the window of the retrain starts cleanly
    drift_at, t_drift = traffic.n, time.time()
    stream(traffic, pool, new, P["drift"], rng, "drift")
    svc.flush_capture()
    return drift_at, t_drift, time.time()


def emergency(reg: ModelRegistry, store: RecordStore, out: Path, P: dict[str, Any], since: float, until: float,
              threads: int) -> dict[str, Any]:
    """The emergency pipeline on what the service captured in [since, until) (through the store's
    capture index); returns its state."""
    suite = SuitePolicy(parts=("elbo", "recon"), examples=P["examples"], tolerance=0.02, new_tolerance=0.0)
    pipe = PipelineConfig(kind="emergency", name="fashion", data=str(out / "capture"), out=str(out / "pipelines"),
                          registry=reg.uri, epochs=P["retrain_epochs"], suite=suite, store=store.uri, since=since,
                          until=until, overrides=(f"train.threads={threads}",))
    return run_pipeline(pipe, reg, log=lambda line: print("  pipeline", line, flush=True))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    preset = "tiny" if args.tiny else "quick" if args.quick else "full"
    P = PRESETS[preset]
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t_start = time.perf_counter()
    ds = load_dataset("fashion-mnist")
    old_train, old_test = without(ds.train, args.new_class), without(ds.test, args.new_class)
    new_test = only(ds.test, args.new_class)
    old = ImageDataset(ds.name, old_train, old_test, ds.classes, ds.provenance + f"; without class {args.new_class}")
    # 1. production: trained without the new line, served with the gate, a record store and the capture
    reg = production(args, P, out, ds, old)
    phases = {"production": time.perf_counter() - t_start}
    store = RecordStore(f"sqlite:///{out / 'monitoring' / 'records.db'}")
    capture = Capture(out / "capture", store, share=args.capture_share, shard_images=500)
    svc = ModelService("fashion@production", registry=reg, store=store, capture=capture, threads=args.threads,
                       max_wait_ms=0, routing=RoutingPolicy(canary_share=P["canary_share"])).start()
    # the window: the last few seconds of traffic (a few hundred requests at this rate), as a monitor
    # process scoring the store every check would see it
    monitor = Monitor(store, reg, "fashion", window_s=6.0, min_requests=P["min_requests"])
    traffic = Traffic(svc, monitor, P["check_every"], P["window_requests"])
    rng = np.random.default_rng(0)
    pool = ImageSplit(old_test.images[3000:], old_test.labels[3000:])  # held out from the profile's images
    # 2. normal traffic, then the drift: 15% the new line, 3% all-black images
    drift_at, t_drift, t_end = normal_then_drift(svc, traffic, pool, new_test, P, rng)
    phases["traffic"] = time.perf_counter() - t_start - sum(phases.values())
    first_alert = next((a for a in traffic.alerts if a["request"] > drift_at and a["status"] == "firing"), None)
    # 3. emergency retrain on what the service captured since the drift (selected through the store's index)
    state = emergency(reg, store, out, P, t_drift, t_end, args.threads)
    phases["pipeline"] = time.perf_counter() - t_start - sum(phases.values())
    captured = {"share": capture.share, "shards": len(store.captures("fashion")), "images": capture.written,
                "since_drift": state["steps"]["validate"]["report"]["images"]}
    # 4. the candidate at 5% of traffic (with the new line at 15%), then the canary decision
    policy = CanaryPolicy(min_requests=P["canary_min"], min_duration_s=0)
    rounds = (svc, traffic, pool, new_test, P["chunk"], P["canary_max"], rng, policy)
    traffic.check_every = P["canary_check_every"]
    promoted, n_prod, n_can = canary_round(reg, store, *rounds, "canary")
    phases["canary"] = time.perf_counter() - t_start - sum(phases.values())
    # 5. a deliberately degraded candidate, rolled back by the same decision
    degraded_canary(reg, out, P["noise"])
    rolled, _, _ = canary_round(reg, store, *rounds, "degraded canary")
    phases["degraded canary"] = time.perf_counter() - t_start - sum(phases.values())
    svc.close()
    history = [e.to_dict() for e in reg.history("fashion")]
    result = {"preset": preset, "quick": args.quick, "new_class": args.new_class, "requests": traffic.n,
              "drift_at": drift_at, "gate_rejected": traffic.rejected, "capture": captured,
              "black_sent": traffic.black_sent, "black_rejected": traffic.black_rejected,
              "rejected_by_phase": traffic.rejected_by_phase,
              "first_alert_after_drift": first_alert, "alerts": traffic.alerts,
              "pipeline": {k: v.get("summary") for k, v in state["steps"].items()},
              "gate": state["steps"]["gate"]["comparisons"],
              "promotion": {"action": promoted.action, "reasons": promoted.reasons, "production_n": n_prod,
                            "canary_n": n_can, "evidence": promoted.evidence},
              "rollback": {"action": rolled.action, "reasons": rolled.reasons},
              "alias_history": history, "timeline": traffic.timeline, "moves": traffic.moves,
              "seconds": round(time.perf_counter() - t_start, 1),
              "phase_seconds": {k: round(v, 1) for k, v in phases.items()}, "settings": P}
    report(result, out, Path(args.results) if args.results else None)
    assert promoted.action == "promote" and rolled.action == "rollback", (promoted.action, rolled.action)


def report(result: dict[str, Any], out: Path, results: Path | None) -> None:
    """Print the timeline and the outcomes; write incident.json and incident.png."""
    timeline = result["timeline"]
    print_table(["request", "phase", "recon MSE", "KS p", "firing", "rejected"],
                [[t["request"], t["phase"], t["recon_mse"] if t["recon_mse"] is not None else "-",
                  t["ks_p"] if t["ks_p"] is not None else "-", ",".join(t["firing"]) or "-", t["rejected"]]
                 for t in timeline])
    print(f"drift at request {result['drift_at']}; first alert {result['first_alert_after_drift']}; "
          f"gate rejected {result['gate_rejected']}; captured {result['capture']}")
    for what in ("promotion", "rollback"):
        print(f"{what}: {result[what]['action']} ({'; '.join(result[what]['reasons'])})")
    for e in result["alias_history"]:
        print(f"  alias {e['alias']}: {e['from_version']} -> {e['to_version']} by {e['actor']}: {e['reason'][:100]}")
    where = results or RESULTS
    where.mkdir(parents=True, exist_ok=True)
    plot(timeline, result["alerts"], result["moves"], result["drift_at"], where / "incident.png")
    if results is not None:
        (where / "incident.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    else:
        write_results("incident", result)
    print(f"timeline: {where / 'incident.png'}; records: {out / 'monitoring' / 'records.db'}; dashboard: "
          f"vaekit monitor dashboard --store sqlite:///{out / 'monitoring' / 'records.db'} --model fashion "
          f"--registry sqlite:///{out / 'registry' / 'registry.db'}")


def plot(timeline, alerts, moves, drift_at, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [t["request"] for t in timeline]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 5), sharex=True, dpi=110)
    a1.plot(x, [t["recon_mse"] for t in timeline], marker="o", label="mean recon MSE (accepted requests)")
    a1.axvline(drift_at, color="red", ls="--", label="drift starts (15% new line, 3% black)")
    for m in moves:
        for a in (a1, a2):
            a.axvline(m["request"], color="green" if m["action"] == "promote" else "purple", lw=2)
        a1.annotate(f"canary {m['action']}", (m["request"], a1.get_ylim()[1]), fontsize=8, ha="right", va="top")
    a1.legend(fontsize=8)
    a2.semilogy(x, [max(t["ks_p"], 1e-300) if t["ks_p"] is not None else np.nan for t in timeline], marker="o",
                label="latent KS p-value (production)")
    a2.axhline(0.01, color="grey", ls=":", label="alpha 0.01")
    for a in alerts:
        if a["status"] == "firing":
            a2.axvline(a["request"], color="orange", alpha=0.3)
    a2.set_xlabel("requests")
    a2.legend(fontsize=8)
    fig.suptitle("incident replay: alerts (orange), emergency retrain, canary promoted, degraded canary rolled back",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
