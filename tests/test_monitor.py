"""The monitor process on real data: a VAE trained briefly on MNIST, registered with a reference profile on
held-out MNIST; records computed with ``model.inspect`` of held-out MNIST (no alert), then Fashion-MNIST (alerts
fire), then MNIST again (resolved). Events reach a real webhook receiver on 127.0.0.1; a restarted monitor does not
fire again. SQLite and PostgreSQL (the ``db_uri`` fixture); several writer processes on one store."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from vaekit.data import ImageDataset, load_dataset
from vaekit.errors import InputError
from vaekit.models import VAE, VAEConfig
from vaekit.monitoring.monitor import Monitor, firing_alerts
from vaekit.monitoring.sinks import LogSink, PrometheusSink, WebhookSink
from vaekit.monitoring.store import RecordStore
from vaekit.registry import ModelRegistry
from vaekit.training import TrainConfig, Trainer

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
ROOT = Path(__file__).resolve().parents[1]
T0 = 1_800_000_000.0  # a fixed clock: windows are given explicitly through run_once(now=...)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist):
    """A VAE trained 1 epoch on 2,000 MNIST images (a few seconds), saved as a model folder."""
    torch.set_num_threads(1)
    ds = ImageDataset("mnist", mnist.train.subset(2000), mnist.test.subset(500), mnist.classes, mnist.provenance)
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=8, hidden_sizes=(128,)))
    cfg = TrainConfig(epochs=1, batch_size=64, checkpoint_every=0, progress=False, tensorboard="off", seed=0,
                      eval_batch_size=500)
    res = Trainer(model, ds, cfg, run_dir=tmp_path_factory.mktemp("run") / "r").fit()
    return res.model_dir


def held(ds, start: int, n: int) -> torch.Tensor:
    return ds.test.images[start:start + n].float() / 255


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist")


def make_records(model, x: torch.Tensor, version: str, t0: float, t1: float, *, route: str = "production",
                 prefix: str = "r", name: str = "mnist") -> list[dict]:
    """One record per image of x, as the service writes them (its figures from model.inspect), spread over [t0, t1)."""
    with torch.no_grad():
        ins = model.inspect(x)
    flat = x.flatten(1).double()
    n = x.shape[0]
    return [{"time": t0 + (t1 - t0) * i / n, "request_id": f"{prefix}{i}", "model": name, "version": version,
             "route": route, "endpoint": "encode", "latency_s": 0.002, "recon_mse": float(ins.recon_mse[i]),
             "recon_nats": float(ins.recon_nats[i]), "kl": float(ins.kl[i]), "latent_norm": float(ins.latent_norm[i]),
             "latent": ins.latent[i].tolist(), "pixel_mean": float(flat[i].mean()),
             "pixel_var": float(flat[i].var(unbiased=False)), "accepted": True} for i in range(n)]


class Receiver:
    """A real HTTP server on 127.0.0.1 collecting the webhook's JSON bodies."""

    def __init__(self):
        bodies = self.bodies = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self) -> list[dict]:
        return [a for b in self.bodies for a in b["alerts"]]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def setup(db_uri, tmp_path, trained, mnist):
    """A registry with mnist/1 (profile on MNIST test images 0-999) and an empty record store, both at db_uri."""
    reg = ModelRegistry(db_uri, artifact_root=tmp_path / "artifacts", actor="tester@ci")
    reg.register(trained, "mnist", alias="production", reason="test",
                 profile_images=held(mnist, 0, 1000))
    store = RecordStore(db_uri)
    model = reg.load("mnist/1")
    model.eval()
    yield reg, store, model
    store.close()
    reg.close()


def test_alerts_fire_on_fashion_and_resolve_on_mnist_and_reach_a_webhook(setup, mnist, fashion, caplog):
    reg, store, model = setup
    hook = Receiver()
    prom = CollectorRegistry()
    try:
        mon = Monitor(store, reg, "mnist", window_s=300, min_requests=200,
                      sinks=[LogSink(), WebhookSink(hook.url, retries=1, backoff=0.05), PrometheusSink(prom)])
        # (a) held-out MNIST (never in the profile): scored, no alert
        store.append(make_records(model, held(mnist, 1000, 400), "1", T0 - 300, T0, prefix="a"))
        it = mon.run_once(now=T0)
        (g,) = it.groups
        assert (g.version, g.route, g.n) == ("1", "production", 400)
        assert {"ks_latent", "moments", "mmd_latent", "recon_p99", "latent_norm", "rolling_mean",
                "input_stats"} <= set(g.results)
        assert it.events == [] and not [r for r in g.results.values() if r.drifted and r.detector in
                                         {"ks_latent", "moments", "mmd_latent", "recon_p99", "input_stats"}]
        assert hook.bodies == []
        # (b) Fashion-MNIST: the latent tests and the recon error fire
        store.append(make_records(model, held(fashion, 0, 400), "1", T0, T0 + 300, prefix="b"))
        with caplog.at_level(logging.WARNING, logger="vaekit.monitoring.alerts"):
            it = mon.run_once(now=T0 + 300)
        fired = {e.rule for e in it.events}
        assert {"latent_ks", "latent_mmd", "recon_error_p99", "input_stats"} <= fired
        assert all(e.status == "firing" and e.version == "1" for e in it.events)
        ks = next(e for e in it.events if e.rule == "latent_ks")
        assert ks.p_value < 0.01 and ks.threshold == 0.01
        got = hook.alerts()
        assert {a["rule"] for a in got} == fired and all(a["status"] == "firing" for a in got)
        assert all(a["fingerprint"].endswith("/production") for a in got)
        assert any("latent_ks" in r.message and r.levelno == logging.WARNING for r in caplog.records)
        text = generate_latest(prom).decode()
        assert 'vaekit_alert_firing{rule="latent_ks",severity="warning",version="1"} 1.0' in text
        assert 'vaekit_drift_detected{detector="ks_latent",version="1"} 1.0' in text
        # the same drift again: deduplicated, nothing new
        store.append(make_records(model, held(fashion, 400, 300), "1", T0 + 300, T0 + 400, prefix="c"))
        assert mon.run_once(now=T0 + 400).events == []
        assert len(hook.alerts()) == len(fired)
        # a restarted monitor rebuilds what fires from the stored events: still nothing new
        mon2 = Monitor(store.uri, reg, "mnist",
                       sinks=[WebhookSink(hook.url, retries=1, backoff=0.05)])
        assert {a["rule"] for a in mon2.firing()} == fired
        assert mon2.run_once(now=T0 + 400).events == []
        # (c) traffic back to MNIST: every alert resolves, once
        store.append(make_records(model, held(mnist, 1400, 400), "1", T0 + 400, T0 + 700, prefix="d"))
        it = mon2.run_once(now=T0 + 700)
        assert {e.rule for e in it.events} == fired and all(e.status == "resolved" for e in it.events)
        assert all(e.since == iso_of(T0 + 300) for e in it.events)
        assert {a["rule"] for a in hook.alerts() if a["status"] == "resolved"} == fired
        assert mon2.run_once(now=T0 + 700).events == []
        mon2.close()
        # the store holds the whole history: fired then resolved, and nothing fires now
        docs = store.alert_events("mnist")
        statuses = [d["status"] for d in docs]
        assert statuses.count("firing") == len(fired) == statuses.count("resolved")
        assert firing_alerts(docs) == [] and all(d["route"] == "production" for d in docs)
        res = store.results("mnist")
        ks_p = [r["p_value"] for r in res if r["detector"] == "ks_latent"]
        assert len(ks_p) == 6 and ks_p[0] > 0.01 and ks_p[1] < 0.01 and ks_p[-1] > 0.01
    finally:
        hook.close()


def iso_of(t: float) -> str:
    from vaekit.monitoring.alerts import iso

    return iso(t)


def test_few_requests_and_unknown_versions_are_skipped_with_a_reason(setup, mnist):
    reg, store, model = setup
    mon = Monitor(store, reg, "mnist", min_requests=200)
    store.append(make_records(model, held(mnist, 1000, 50), "1", T0 - 100, T0, prefix="a"))
    store.append(make_records(model, held(mnist, 1000, 250), "7", T0 - 100, T0, prefix="b", route="canary"))
    it = mon.run_once(now=T0)
    by = {(g.version, g.route): g for g in it.groups}
    assert by[("1", "production")].results == {}
    assert "fewer than min_requests=200" in by[("1", "production")].skipped["*"]
    # a version without a profile gets only the gate's rejection share (it needs no reference), not drifted here
    assert set(by[("7", "canary")].results) == {"gate_rejections"}
    assert not by[("7", "canary")].results["gate_rejections"].drifted
    assert "no reference profile for mnist/7" in by[("7", "canary")].skipped["*"]
    assert it.events == []


def rejected_records(n: int, version: str, t0: float, t1: float, *, reason: str = "low_variance",
                     prefix: str = "x") -> list[dict]:
    """Images the gate refused, as the service records them: no model figures, accepted False and the reason."""
    return [{"time": t0 + (t1 - t0) * i / n, "request_id": f"{prefix}{i}", "model": "mnist", "version": version,
             "route": "production", "endpoint": "encode", "latency_s": 0.0, "batch_size": 0, "accepted": False,
             "reason": reason, "pixel_mean": 0.0, "pixel_var": 0.0} for i in range(n)]


def test_gate_rejection_share_fires_and_resolves_through_the_default_rules(setup, mnist):
    """3 % all-black uploads, which no drift detector sees (they never reach the model), fire gate_rejections;
    the p-value is the binomial tail by hand; a window of refused images only still fires; clean traffic resolves."""
    reg, store, model = setup
    mon = Monitor(store, reg, "mnist", window_s=300, min_requests=200)
    # (a) 0.4 % refused (2 of 500): at the clean rate, no alert
    store.append(make_records(model, held(mnist, 1000, 498), "1", T0 - 300, T0, prefix="a"))
    store.append(rejected_records(2, "1", T0 - 300, T0, prefix="ax"))
    it = mon.run_once(now=T0)
    r = it.groups[0].results["gate_rejections"]
    assert (r.n, r.details["rejected"], r.drifted) == (500, 2, False) and it.events == []
    # (b) 15 of 500 (3 %): fires, with the binomial tail P(K >= 15), K ~ Binomial(500, 0.002), as its p-value
    store.append(make_records(model, held(mnist, 1500, 485), "1", T0, T0 + 300, prefix="b"))
    store.append(rejected_records(15, "1", T0, T0 + 300, prefix="bx"))
    it = mon.run_once(now=T0 + 300)
    r = it.groups[0].results["gate_rejections"]
    tail = sum(math.comb(500, j) * 0.002 ** j * 0.998 ** (500 - j) for j in range(15, 501))
    assert r.statistic == pytest.approx(0.03) and r.p_value == pytest.approx(tail, rel=1e-9) and r.drifted
    assert r.details["by_reason"] == {"low_variance": 15}
    (e,) = [e for e in it.events if e.rule == "gate_rejections"]
    assert e.status == "firing" and e.severity == "warning" and e.value == pytest.approx(0.03)
    assert not it.groups[0].results["ks_latent"].drifted  # the accepted images are clean MNIST
    # (c) only refused images (no accepted one to score): still scored, still firing, no new event
    store.append(rejected_records(300, "1", T0 + 300, T0 + 600, reason="range", prefix="cx"))
    it = mon.run_once(now=T0 + 600)
    (g,) = it.groups
    assert g.n == 0 and set(g.results) == {"gate_rejections"} and g.results["gate_rejections"].drifted
    assert g.results["gate_rejections"].details["by_reason"] == {"range": 300} and it.events == []
    # (d) clean again: resolved once; the stored history and results say so
    store.append(make_records(model, held(mnist, 2000, 400), "1", T0 + 600, T0 + 900, prefix="d"))
    it = mon.run_once(now=T0 + 900)
    assert [(e.rule, e.status) for e in it.events] == [("gate_rejections", "resolved")]
    docs = [d for d in store.alert_events("mnist") if d["rule"] == "gate_rejections"]
    assert [d["status"] for d in docs] == ["firing", "resolved"]
    shares = [x["statistic"] for x in store.results("mnist") if x["detector"] == "gate_rejections"]
    assert shares == pytest.approx([0.004, 0.03, 1.0, 0.0])


def test_arguments_are_checked():
    with pytest.raises(InputError, match="window_s must be a number > 0, got -1"):
        Monitor(None, None, "m", window_s=-1)
    with pytest.raises(InputError, match="min_requests must be an integer > 1"):
        Monitor(None, None, "m", min_requests=0)
    with pytest.raises(InputError, match="alpha must be a number in"):
        Monitor(None, None, "m", alpha=2)
    with pytest.raises(InputError, match="emit"):
        Monitor(None, None, "m", sinks=[object()])


WRITER = """
import sys, json
from vaekit.monitoring.store import RecordStore
recs = json.load(open(sys.argv[2]))
s = RecordStore(sys.argv[1])
for i in range(0, len(recs), 50):  # batches, as the service's dispatcher writes them
    s.write(recs[i:i + 50])
s.close()
"""


def test_several_writer_processes_on_one_store(setup, mnist, fashion, tmp_path, db_uri):
    """Two service-like processes write records of one version concurrently; the monitor scores them together."""
    reg, store, model = setup
    halves = [make_records(model, held(fashion, 0, 150), "1", T0 - 300, T0, prefix="p0-"),
              make_records(model, held(fashion, 150, 150), "1", T0 - 300, T0, prefix="p1-")]
    files = []
    for k, recs in enumerate(halves):
        files.append(tmp_path / f"recs{k}.json")
        files[-1].write_text(json.dumps(recs))
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, db_uri, str(f)], env=env) for f in files]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    it = Monitor(store, reg, "mnist").run_once(now=T0)
    (g,) = it.groups
    assert g.n == 300 and "latent_ks" in {e.rule for e in it.events}
