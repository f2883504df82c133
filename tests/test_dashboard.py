"""The dashboard: rendered from a real store (records of a VAE trained on MNIST, a Fashion-MNIST episode that the
monitor alerted on and resolved, gate rejections, alias moves), served live by ``vaekit monitor dashboard`` and by the
service at ``/dashboard``, and loaded in real headless Chromium (Playwright pointed at Debian's /usr/bin/chromium),
which checks the charts and the alert row and saves a screenshot."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_monitor import fashion, held, make_records, trained  # noqa: F401  (fixtures)
from test_serving_load import free_port

from vaekit.cli.main import main
from vaekit.monitoring.dashboard import line_chart, render_dashboard
from vaekit.monitoring.monitor import Monitor
from vaekit.monitoring.store import RecordStore
from vaekit.registry import ModelRegistry

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
PERIOD = 300.0


@pytest.fixture(scope="module")
def populated(tmp_path_factory, trained, mnist, fashion):  # noqa: F811
    """A SQLite registry and store: 2 hours of traffic ending now (80 images per 5 minutes, with a Fashion-MNIST
    episode 60-40 minutes ago and a few gate rejections), the monitor run every 5 minutes over 15-minute windows."""
    root = tmp_path_factory.mktemp("dash")
    uri = f"sqlite:///{root / 'db' / 'monitor.db'}"
    reg = ModelRegistry(uri, artifact_root=root / "artifacts", actor="tester@ci")
    reg.register(trained, "mnist", alias="production", reason="first release",
                 profile_images=held(mnist, 0, 1000))
    reg.set_alias("mnist", "canary", 1, "canary on the same version")
    model = reg.load("mnist/1").eval()
    store = RecordStore(uri)
    now = time.time()
    start = now - 2 * 3600
    mon = Monitor(store, reg, "mnist", window_s=900, min_requests=200)
    clean, odd = held(mnist, 1000, 24 * 80), held(fashion, 0, 24 * 80)
    for k in range(24):
        t0 = start + k * PERIOD
        x = (odd if 12 <= k < 16 else clean)[k * 80:(k + 1) * 80]
        recs = make_records(model, x, "1", t0, t0 + PERIOD, prefix=f"k{k}-")
        if k % 5 == 2:  # an all-black image now and then: rejected by the gate, never scored
            recs.append({"time": t0 + 1, "request_id": f"black{k}", "model": "mnist", "version": "1",
                         "endpoint": "encode", "accepted": False, "reason": "low_variance: pixel variance 0 < 0.01",
                         "pixel_mean": 0.0, "pixel_var": 0.0})
        store.append(recs)
        if k >= 2:
            mon.run_once(now=t0 + PERIOD)
    yield store, reg, now
    store.close()
    reg.close()


def test_page_has_charts_with_data_the_alerts_and_the_alias_moves(populated):
    store, reg, now = populated
    page = render_dashboard(store, "mnist", reg, hours=3, now=now)
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    paths = re.findall(r'<path class="series" data-series="([^"]+)" d="([^"]+)"', page)
    labels = {s for s, _ in paths}
    assert "v1 production" in labels and {"ks_latent", "mmd_latent", "recon_p99"} <= labels
    assert all(d.count("L") >= 5 for _, d in paths)
    assert page.count('<tr class="alert firing">') >= 3 and page.count('<tr class="alert resolved">') >= 3
    assert "latent_ks" in page and "no alert firing" in page  # the episode resolved
    assert page.count('class="marker"') >= 1 and "canary on the same version" in page
    assert "1925 request(s), 5 rejected by the gate" in page


def test_line_chart_breaks_at_missing_values_and_clips_p_values():
    svg = line_chart("t", [("a", [0, 1, 2, 3], [1.0, None, 2.0, 3.0])], (0, 3))
    (d,) = re.findall(r' d="([^"]+)"', svg)
    assert d.count("M") == 2 and d.count("L") == 1  # the gap starts a new segment
    log = line_chart("p", [("p", [0, 1], [0.0, 0.5])], (0, 1), log_y=True, hline=0.01)
    assert "1e-12" in log and 'class="hline"' in log  # p = 0 drawn at the floor, not dropped
    assert "no data" in line_chart("e", [("a", [], [])], (0, 1))


def test_cli_dashboard_to_a_file_and_report(populated, tmp_path, capsys):
    store, reg, now = populated
    out = tmp_path / "d.html"
    assert main(["monitor", "dashboard", "--store", store.uri, "--registry", reg.uri, "--artifacts",
                 str(reg.store.root), "--model", "mnist", "--hours", "3", "-o", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>") and 'class="series"' in out.read_text()


def _serve_dashboard(store, reg, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "vaekit.cli.main", "monitor", "dashboard", "--store", store.uri,
                             "--registry", reg.uri, "--artifacts", str(reg.store.root), "--model", "mnist",
                             "--hours", "3", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise AssertionError(f"the dashboard server exited: {proc.stdout.read()}")
    proc.kill()
    raise AssertionError("the dashboard server did not come up in 60 s")


def test_live_dashboard_in_headless_chromium(populated, tmp_path):
    if not Path(CHROMIUM).is_file():
        why = f"{CHROMIUM} is missing (apt-get install chromium)"
        if os.environ.get("VAEKIT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"VAEKIT_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("VAEKIT_REQUIRE_BROWSER") == "1":
            pytest.fail("VAEKIT_REQUIRE_BROWSER=1 but playwright is not installed (the dev extra)")
        pytest.skip("playwright is not installed (pip install 'playwright>=1.40,<2')")
    store, reg, _ = populated
    port = free_port()
    proc = _serve_dashboard(store, reg, port)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run"])
            try:
                page = browser.new_page(viewport={"width": 1240, "height": 900})
                failed: list[str] = []
                urls: list[str] = []
                page.on("requestfailed", lambda r: failed.append(r.url))
                page.on("request", lambda r: urls.append(r.url))
                resp = page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
                assert resp is not None and resp.status == 200
                assert page.title() == "vaekit monitoring: mnist"
                paths = page.locator("svg.chart path.series")
                assert paths.count() >= 6
                # every series path has data, and the browser laid it out (a real bounding box)
                for i in range(paths.count()):
                    assert paths.nth(i).get_attribute("d").count("L") >= 5
                box = page.locator('svg.chart path[data-series="ks_latent"]').first.bounding_box()
                assert box is not None and box["width"] > 100
                rows = page.locator("#alerts tr.alert.firing")
                assert rows.count() >= 3 and "latent_ks" in page.locator("#alerts").inner_text()
                assert page.locator("svg.timeline rect.bar").count() >= 3
                # the page is self-contained: the browser fetched it and nothing else (no CDN, no font, no script)
                assert failed == [] and urls == [f"http://127.0.0.1:{port}/"]
                shot = tmp_path / "dashboard.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 20_000
                if os.environ.get("VAEKIT_UPDATE_SCREENSHOT") == "1":
                    shutil.copy(shot, ROOT / "docs" / "dashboard.png")
            finally:
                browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_service_serves_the_dashboard_of_its_record_store(tmp_path, trained, mnist, fashion):  # noqa: F811
    """A live service following mnist@production writes its records to a RecordStore; the monitor alerts on the
    Fashion-MNIST requests; GET /dashboard shows the charts and the alert. Without a store there is no route."""
    from fastapi.testclient import TestClient

    from vaekit.serving import ModelService, create_app

    uri = f"sqlite:///{tmp_path / 'db' / 'm.db'}"
    reg = ModelRegistry(uri, artifact_root=tmp_path / "artifacts", actor="tester@ci")
    reg.register(trained, "mnist", alias="production", reason="first release", profile_images=held(mnist, 0, 1000))
    store = RecordStore(uri)
    service = ModelService("mnist@production", registry=reg, sink=store, max_batch_size=32)
    with TestClient(create_app(service)) as client:
        for x in (held(mnist, 1000, 300), held(fashion, 0, 300)):
            for i in range(0, len(x), 50):
                r = client.post("/v1/models/mnist/encode", json={"x": x[i:i + 50].tolist()})
                assert r.status_code == 200, r.text
        deadline = time.monotonic() + 30
        while store.count("mnist") < 600 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.count("mnist") == 600
        it = Monitor(store, reg, "mnist", window_s=3600, min_requests=200).run_once()
        assert "latent_ks" in {e.rule for e in it.events}  # a window half Fashion-MNIST
        page = client.get("/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<path class="series" data-series="v1 production"' in page.text
        assert '<tr class="alert firing">' in page.text and "latent_ks" in page.text
        assert "first release" in page.text  # the alias move, from the service's registry
        assert client.get("/dashboard", params={"model": "other"}).status_code == 404
    bare = ModelService("mnist@production", registry=reg)
    with TestClient(create_app(bare)) as client:
        assert client.get("/dashboard").status_code == 404
    store.close()
    reg.close()


def test_grafana_dashboard_queries_only_metrics_that_exist(tmp_path, trained, mnist):  # noqa: F811
    """Every vaekit_* series the Grafana JSON queries is in a real exposition: the service's /metrics after
    requests, and the monitor's PrometheusSink after a scored window with an alert."""
    import json

    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from vaekit.monitoring.alerts import AlertState, default_rules, evaluate_rules
    from vaekit.monitoring.detectors import DetectorResult
    from vaekit.monitoring.sinks import PrometheusSink
    from vaekit.serving import ModelService, create_app

    doc = json.loads((ROOT / "deploy" / "grafana" / "vaekit.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    wanted = {m for e in exprs for m in re.findall(r"\bvaekit_[a-z_]+", e)}
    with TestClient(create_app(ModelService(str(trained)))) as client:
        assert client.post(f"/v1/models/{Path(trained).name}/encode",
                           json={"x": held(mnist, 0, 4).tolist()}).status_code == 200
        deadline = time.monotonic() + 20
        while True:  # the per-image histograms are observed off the request path, on the records thread
            served = client.get("/metrics").text
            if "vaekit_latent_norm_count{" in served or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    prom = CollectorRegistry()
    sink = PrometheusSink(prom)
    res = [DetectorResult("ks_latent", 0.5, True, 0.01, 1e-6, 300)]
    sink.observe(res, "1")
    sink.emit(evaluate_rules(default_rules(), res, AlertState(), version="1", window=(0, 300)))
    fams = [fam for text in (served, generate_latest(prom).decode()) for fam in text_string_to_metric_families(text)]
    have = {s.name for fam in fams for s in fam.samples}
    have |= {f"{fam.name}_total" for fam in fams if fam.type == "counter"}  # declared (a swap has not happened yet)
    assert wanted and wanted <= have, sorted(wanted - have)
    assert doc["uid"] == "vaekit-serving" and len(exprs) >= 12
