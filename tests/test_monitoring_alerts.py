"""Alert rules (a pure function) and the sinks: log, a webhook against a real local HTTP server, Prometheus."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from vaekit.errors import InputError, WebhookError
from vaekit.monitoring.alerts import AlertState, Rule, default_rules, evaluate_rules
from vaekit.monitoring.detectors import DetectorResult, default_detectors
from vaekit.monitoring.sinks import LogSink, PrometheusSink, WebhookSink

RULES = [Rule("latent_ks", "ks_latent", "warning"), Rule("recon", "recon_p99", "critical")]


def res(detector: str, drifted: bool, p: float | None = 0.5) -> DetectorResult:
    return DetectorResult(detector, 0.3 if drifted else 0.01, drifted, 0.01, p, 500)


def test_firing_deduplicated_resolved():
    state = AlertState()
    e1 = evaluate_rules(RULES, [res("ks_latent", True, 1e-5), res("recon_p99", False)], state,
                        version="3", window=(0.0, 300.0))
    assert [(e.rule, e.status) for e in e1] == [("latent_ks", "firing")]
    a = e1[0]
    assert (a.version, a.threshold, a.p_value, a.severity) == ("3", 0.01, 1e-5, "warning")
    assert a.window == ("1970-01-01T00:00:00.000Z", "1970-01-01T00:05:00.000Z") and a.since == a.at
    assert a.fingerprint == "latent_ks@3" and "drift detected" in a.message
    assert state.firing == {}  # pure: the state passed in is untouched
    state = state.apply(e1)
    # still drifted: nothing new (one event per episode)
    assert evaluate_rules(RULES, [res("ks_latent", True, 1e-6)], state, version="3", window=(300, 600)) == []
    # another version is another alert
    other = evaluate_rules(RULES, [res("ks_latent", True, 1e-6)], state, version="4", window=(300, 600))
    assert [e.fingerprint for e in other] == ["latent_ks@4"]
    # no result for the detector: neither raised nor resolved
    assert evaluate_rules(RULES, [], state, version="3", window=(600, 900)) == []
    e3 = evaluate_rules(RULES, {"ks_latent": res("ks_latent", False)}, state, version="3", window=(900, 1200))
    assert [(e.status, e.since) for e in e3] == [("resolved", a.at)]
    assert state.apply(e3).firing == {}


def test_rule_and_argument_errors():
    with pytest.raises(Exception, match="severity"):
        Rule("r", "ks_latent", "urgent")
    with pytest.raises(InputError, match="unique"):
        evaluate_rules([RULES[0], RULES[0]], [], AlertState(), version="1", window=(0, 1))
    with pytest.raises(InputError, match="window"):
        evaluate_rules(RULES, [], AlertState(), version="1", window=(5, 1))
    with pytest.raises(InputError, match="version"):
        evaluate_rules(RULES, [], AlertState(), version="", window=(0, 1))
    with pytest.raises(InputError, match="DetectorResult"):
        evaluate_rules(RULES, [{"detector": "x"}], AlertState(), version="1", window=(0, 1))


def test_default_rules_name_default_detectors():
    from vaekit.monitoring.detectors import GateRejectionDetector

    names = set(default_detectors()) | {GateRejectionDetector.name}  # the monitor scores the gate's share too
    assert all(r.detector in names for r in default_rules())
    assert "gate_rejections" in {r.name for r in default_rules()}


def test_log_sink(caplog):
    events = evaluate_rules(RULES, [res("recon_p99", True, 1e-4)], AlertState(), version="2", window=(0, 300))
    with caplog.at_level(logging.INFO, logger="vaekit.monitoring.alerts"):
        LogSink().emit(events)
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.WARNING
    assert '"rule": "recon"' in caplog.records[0].getMessage()


class Receiver:
    """A real HTTP server on 127.0.0.1 answering the queued status codes in turn (then 200)."""

    def __init__(self, statuses: list[int]):
        self.statuses, self.bodies = list(statuses), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.bodies.append((self.headers["Content-Type"], json.loads(body)))
                code = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def events():
    return evaluate_rules(RULES, [res("ks_latent", True, 1e-5), res("recon_p99", True, 1e-3)], AlertState(),
                          version="7", window=(0, 300))


def test_webhook_retries_5xx_then_delivers():
    with Receiver([503, 502]) as rx:
        sink = WebhookSink(rx.url, retries=3, backoff=0.01)
        sink.emit(events())
    assert sink.attempts == 3 and len(rx.bodies) == 3
    ctype, body = rx.bodies[-1]
    assert ctype == "application/json"
    assert [a["rule"] for a in body["alerts"]] == ["latent_ks", "recon"]
    assert body["alerts"][0]["status"] == "firing" and body["alerts"][0]["version"] == "7"


def test_webhook_4xx_is_not_retried():
    with Receiver([400]) as rx:
        sink = WebhookSink(rx.url, retries=3, backoff=0.01)
        with pytest.raises(WebhookError, match="HTTP 400.*not retried"):
            sink.emit(events())
    assert sink.attempts == 1


def test_webhook_gives_up_on_a_closed_port():
    with Receiver([]) as rx:
        url = rx.url
    sink = WebhookSink(url, retries=2, backoff=0.01, timeout=1.0)  # the server is gone: connection refused
    with pytest.raises(WebhookError, match="3 attempt"):
        sink.emit(events())
    assert sink.attempts == 3
    with pytest.raises(InputError, match="url"):
        WebhookSink("ftp://x")


def test_prometheus_gauges():
    registry = CollectorRegistry()
    sink = PrometheusSink(registry)
    sink.observe([res("ks_latent", True, 1e-5), DetectorResult("rolling_mean", 4.2, True, 3.0, None, 300)], "7")
    assert registry.get_sample_value("vaekit_drift_p_value", {"detector": "ks_latent", "version": "7"}) == 1e-5
    assert registry.get_sample_value("vaekit_drift_statistic", {"detector": "rolling_mean", "version": "7"}) == 4.2
    assert registry.get_sample_value("vaekit_drift_detected", {"detector": "rolling_mean", "version": "7"}) == 1.0
    evs = events()
    sink.emit(evs)
    labels = {"rule": "recon", "version": "7", "severity": "critical"}
    assert registry.get_sample_value("vaekit_alert_firing", labels) == 1.0
    resolved = evaluate_rules(RULES, [res("recon_p99", False)], AlertState().apply(evs), version="7",
                              window=(300, 600))
    sink.emit(resolved)
    assert registry.get_sample_value("vaekit_alert_firing", labels) == 0.0
    assert b"vaekit_alert_firing" in generate_latest(registry)
    with pytest.raises(InputError, match="CollectorRegistry"):
        PrometheusSink(None)
