"""``vaekit monitor``: run as its own process (one iteration, and a loop ended by SIGTERM) against a store with real
records, on SQLite and PostgreSQL; status / alerts / report for a person; one-line errors and exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_monitor import Receiver, fashion, held, make_records, trained  # noqa: F401  (fixtures)

from vaekit.cli.main import main
from vaekit.monitoring.store import RecordStore
from vaekit.registry import ModelRegistry

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


@pytest.fixture
def drifted(db_uri, tmp_path, trained, mnist, fashion):  # noqa: F811
    """mnist/1 registered (profile on MNIST), and 300 Fashion-MNIST records of it in the last 5 minutes."""
    reg = ModelRegistry(db_uri, artifact_root=tmp_path / "artifacts", actor="tester@ci")
    reg.register(trained, "mnist", alias="production", reason="test", profile_images=held(mnist, 0, 1000))
    model = reg.load("mnist/1").eval()
    store = RecordStore(db_uri)
    now = time.time()
    store.append(make_records(model, held(fashion, 0, 300), "1", now - 240, now - 1))
    args = ["--store", db_uri, "--registry", db_uri, "--artifacts", str(tmp_path / "artifacts"), "--model", "mnist"]
    yield store, args, ["--store", db_uri, "--model", "mnist"]
    store.close()
    reg.close()


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vaekit.cli.main", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def test_run_once_as_its_own_process_alerts_and_posts_to_the_webhook(drifted, capsys):
    store, args, store_args = drifted
    hook = Receiver()
    try:
        p = _cli("monitor", "run", *args, "--once", "--webhook", hook.url)
        assert p.returncode == 0, p.stderr
        assert "v1 production: 300 request(s)" in p.stdout and "latent_ks firing" in p.stdout
        assert "latent_ks" in {a["rule"] for a in hook.alerts()}
    finally:
        hook.close()
    assert "latent_ks" in {e["rule"] for e in store.alert_events("mnist")}
    # a second process: the alert fires already, nothing new is emitted
    p = _cli("monitor", "run", *args, "--iterations", "1", "--json")
    assert p.returncode == 0, p.stderr
    (line,) = p.stdout.strip().splitlines()
    assert json.loads(line)["groups"][0]["events"] == []
    # for a person: status, alerts, report
    assert main(["monitor", "status", *store_args, "--fail-on-firing"]) == 3
    out = capsys.readouterr().out
    assert "v1 production: 300 request(s) (300 accepted)" in out and "FIRING latent_ks" in out
    assert main(["monitor", "status", *store_args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["groups"][0]["latest_rollup"]["n"] >= 1 and doc["firing"]
    assert main(["monitor", "alerts", *store_args, "--firing", "--json"]) == 0
    firing = json.loads(capsys.readouterr().out)
    assert {a["rule"] for a in firing} >= {"latent_ks"} and all(a["status"] == "firing" for a in firing)
    assert main(["monitor", "alerts", *store_args]) == 0
    assert "firing   latent_ks" in capsys.readouterr().out


def test_report_markdown_and_json(drifted, tmp_path, capsys):
    store, args, store_args = drifted
    assert main(["monitor", "run", *args, "--once"]) == 0
    capsys.readouterr()
    md = tmp_path / "r.md"
    assert main(["monitor", "report", *store_args, "-o", str(md)]) == 0
    text = md.read_text()
    assert text.startswith("# Monitoring report: mnist") and "**latent_ks**" in text and "| ks_latent |" in text
    js = tmp_path / "r.json"
    assert main(["monitor", "report", *store_args, "-o", str(js)]) == 0
    doc = json.loads(js.read_text())
    assert doc["totals"][0]["n"] == 300 and doc["latest_results"][0]["detectors"]["ks_latent"]["drifted"]


def test_run_loop_ends_cleanly_on_sigterm(drifted):
    _, args, _ = drifted
    proc = subprocess.Popen([sys.executable, "-m", "vaekit.cli.main", "monitor", "run", *args, "--interval", "0.5"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert "v1 production" in first
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("argv, message", [
    (["monitor", "status", "--model", "m"], "no record store: give --store URI"),
    (["monitor", "status", "--model", "m", "--store", "mysql://x"], "--store must be a sqlite:///PATH"),
    (["monitor", "alerts", "--model", "m", "--store", "sqlite:////nonexistent/x.db"], "no such file"),
    (["monitor", "report", "--model", "m", "--store", "sqlite:////tmp/x.db", "-o", "r.txt"], "-o must end in .md"),
    (["monitor", "run", "--model", "m", "--store", "sqlite:////tmp/x.db", "--interval", "0"], "--interval must be"),
])
def test_errors_are_one_line_with_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("VAEKIT_STORE", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("vaekit monitor: error:")
