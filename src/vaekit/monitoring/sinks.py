"""Alert sinks: where alert events go. Each has ``emit(alerts)``; none decides anything.

* :class:`LogSink`: one log line per event (Python logging).
* :class:`WebhookSink`: a JSON POST ``{"alerts": [...]}`` per batch of events (httpx), retried
  with exponential back-off on connection errors, timeouts, 429 and 5xx; a 4xx other than 429 is
  the receiver refusing the payload and is not retried. WebhookError when it gives up.
* :class:`PrometheusSink`: gauges in a caller-supplied prometheus_client CollectorRegistry: the
  latest statistic, p-value and drift flag per detector and version (``observe(results)``) and
  1/0 per firing alert (``emit(alerts)``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Gauge

from vaekit.errors import InputError, WebhookError, describe
from vaekit.monitoring.alerts import Alert
from vaekit.monitoring.detectors import DetectorResult

log = logging.getLogger("vaekit.monitoring.alerts")


class LogSink:
    """Log each event at ``level`` (firing) or INFO (resolved) on ``logger`` (default vaekit.monitoring.alerts)."""

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.WARNING):
        self.logger, self.level = logger or log, level

    def emit(self, alerts: Sequence[Alert]) -> None:
        for a in alerts:
            level = self.level if a.status == "firing" else logging.INFO
            self.logger.log(level, "alert %s: %s %s", a.status, a.message, json.dumps(a.to_dict(), sort_keys=True))


class WebhookSink:
    """POST events as JSON to ``url``; up to ``retries`` extra attempts, sleeping ``backoff * 2**i`` s."""

    def __init__(self, url: str, *, timeout: float = 5.0, retries: int = 3, backoff: float = 0.5,
                 headers: Mapping[str, str] | None = None, client: httpx.Client | None = None):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise InputError(f"url must be an http:// or https:// URL, got {describe(url)}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InputError(f"retries must be an integer >= 0, got {describe(retries)}")
        for name, v in (("timeout", timeout), ("backoff", backoff)):
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0 or (name == "timeout" and v == 0):
                raise InputError(f"{name} must be a number {'> 0' if name == 'timeout' else '>= 0'}, got {describe(v)}")
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.headers = dict(headers or {})
        self._client = client
        self.attempts = 0  # POSTs made (for metrics and tests)

    def emit(self, alerts: Sequence[Alert]) -> None:
        if not alerts:
            return
        payload = {"alerts": [a.to_dict() for a in alerts]}
        client = self._client or httpx.Client(timeout=self.timeout)
        last = ""
        try:
            for attempt in range(self.retries + 1):
                if attempt:
                    time.sleep(self.backoff * 2 ** (attempt - 1))
                self.attempts += 1
                try:
                    resp = client.post(self.url, json=payload, headers=self.headers, timeout=self.timeout)
                except httpx.TransportError as exc:  # refused, reset, timed out: worth another try
                    last = f"{type(exc).__name__}: {exc}"
                    continue
                if resp.status_code < 300:
                    return
                last = f"HTTP {resp.status_code}"
                if resp.status_code < 500 and resp.status_code != 429:
                    raise WebhookError(f"webhook {self.url} refused {len(alerts)} alert(s): {last} "
                                       f"{resp.text[:200]!r}; not retried")
        finally:
            if self._client is None:
                client.close()
        raise WebhookError(f"webhook {self.url}: {self.retries + 1} attempt(s) failed, last: {last}")


class PrometheusSink:
    """Gauges in ``registry`` (a prometheus_client CollectorRegistry the caller owns and exposes)."""

    def __init__(self, registry: CollectorRegistry, namespace: str = "vaekit"):
        if not isinstance(registry, CollectorRegistry):
            raise InputError(f"registry must be a prometheus_client.CollectorRegistry, got {type(registry).__name__}")
        self.registry = registry
        labels = ["detector", "version"]
        self.statistic = Gauge("drift_statistic", "latest drift statistic per detector", labels,
                               namespace=namespace, registry=registry)
        self.p_value = Gauge("drift_p_value", "latest drift p-value per detector (NaN: a rule without one)",
                             labels, namespace=namespace, registry=registry)
        self.drifted = Gauge("drift_detected", "1 when the latest window drifted", labels,
                             namespace=namespace, registry=registry)
        self.firing = Gauge("alert_firing", "1 while the alert fires", ["rule", "version", "severity"],
                            namespace=namespace, registry=registry)

    def observe(self, results: Mapping[str, DetectorResult] | Sequence[DetectorResult], version: str) -> None:
        items: Any = results.values() if isinstance(results, Mapping) else results
        for r in items:
            self.statistic.labels(r.detector, version).set(r.statistic)
            self.p_value.labels(r.detector, version).set(float("nan") if r.p_value is None else r.p_value)
            self.drifted.labels(r.detector, version).set(1.0 if r.drifted else 0.0)

    def emit(self, alerts: Sequence[Alert]) -> None:
        for a in alerts:
            self.firing.labels(a.rule, a.version, a.severity).set(1.0 if a.status == "firing" else 0.0)
