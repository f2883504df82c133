"""Prometheus metrics of one app, in its own ``CollectorRegistry`` (two apps in one process, as in
the tests, never share or collide).

Names (Prometheus conventions: base units, ``_total`` counters):

* ``vaekit_requests_total{endpoint,status,version}``: HTTP requests answered.
* ``vaekit_request_duration_seconds{endpoint}``: time from request start to response start;
  buckets from 0.5 ms.
* ``vaekit_recon_error_nats{model,version}``, ``vaekit_recon_mse{model,version}``,
  ``vaekit_kl_nats{model,version}``, ``vaekit_latent_norm{model,version}``: per served image.
* ``vaekit_batch_size{model}``: images per model call; ``vaekit_queue_depth{model}``: jobs waiting.
* ``vaekit_model_swaps_total{model}``, ``vaekit_model_info{model,version}`` (1 for the serving version),
  ``vaekit_records_dropped_total{model}`` (record queue overflow), ``vaekit_records_written_total{model}``,
  ``vaekit_shadow_dropped_total{model}``, ``vaekit_shadow_errors_total{model}``.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
NATS_BUCKETS = (10, 25, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 2000, 5000)
MSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3)
KL_BUCKETS = (0.1, 1, 2.5, 5, 10, 15, 20, 30, 40, 60, 100)
NORM_BUCKETS = (0.25, 0.5, 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, 20)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The metric objects of one app; ``observe_batch`` is a ModelService observer."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("vaekit_requests", "HTTP requests answered", ("endpoint", "status", "version"),
                                registry=r)
        self.duration = Histogram("vaekit_request_duration_seconds", "HTTP request latency (to response start)",
                                  ("endpoint",), buckets=LATENCY_BUCKETS, registry=r)
        labels = ("model", "version")
        self.recon_nats = Histogram("vaekit_recon_error_nats", "-log p(x|z) per served image, nats", labels,
                                    buckets=NATS_BUCKETS, registry=r)
        self.recon_mse = Histogram("vaekit_recon_mse", "per-pixel reconstruction MSE per served image", labels,
                                   buckets=MSE_BUCKETS, registry=r)
        self.kl = Histogram("vaekit_kl_nats", "KL(q(z|x) || p(z)) per served image, nats", labels,
                            buckets=KL_BUCKETS, registry=r)
        self.latent_norm = Histogram("vaekit_latent_norm", "norm of the posterior mean per served image", labels,
                                     buckets=NORM_BUCKETS, registry=r)
        self.batch_size = Histogram("vaekit_batch_size", "images per model call", ("model",),
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("vaekit_queue_depth", "jobs waiting for the model", ("model",), registry=r)
        self.swaps = Counter("vaekit_model_swaps", "model version swaps", ("model",), registry=r)
        self.info = Gauge("vaekit_model_info", "1 for the version being served", ("model", "version"), registry=r)
        self.dropped = Gauge("vaekit_records_dropped_total", "request records dropped (sink queue full)",
                             ("model",), registry=r)
        self.records_written = Gauge("vaekit_records_written_total", "request records handed to the sink",
                                     ("model",), registry=r)
        self.shadow_dropped = Gauge("vaekit_shadow_dropped_total", "requests not mirrored to the shadow "
                                    "(its queue was full, or incompatible)", ("model",), registry=r)
        self.shadow_errors = Gauge("vaekit_shadow_errors_total", "mirrored requests the shadow failed on",
                                   ("model",), registry=r)
        self._watched: set[int] = set()

    def watch(self, service: Any) -> None:
        """Attach to a started ModelService (once; later calls do nothing): stats observer, swap listener,
        live gauges. A service shared by two apps feeds both apps' metrics."""
        if id(service) in self._watched:
            return
        self._watched.add(id(service))
        name = service.name
        self.queue_depth.labels(name).set_function(lambda: service.queue_depth)
        self.dropped.labels(name).set_function(lambda: service.records_dropped)
        self.records_written.labels(name).set_function(lambda: service.records_written)
        self.shadow_dropped.labels(name).set_function(lambda: service.shadow_dropped)
        self.shadow_errors.labels(name).set_function(lambda: service.shadow_errors)
        self.info.labels(name, service.version).set(1)
        service.observers.append(self.observe_batch)

        def swapped(old: str | None, new: str) -> None:
            self.swaps.labels(name).inc()
            if old is not None:
                self.info.labels(name, old).set(0)
            self.info.labels(name, new).set(1)

        service.swap_listeners.append(swapped)

    def observe_batch(self, results: list[Any], batch: int) -> None:
        """Per-image stats of a batch's results (runs on the records thread, off the request path)."""
        if not results:
            return
        self.batch_size.labels(results[0].model).observe(batch)
        for r in results:
            s = r.stats
            if s is None:
                continue
            for hist, values in ((self.recon_nats, s.recon_nats), (self.recon_mse, s.recon_mse), (self.kl, s.kl),
                                 (self.latent_norm, s.latent_norm)):
                if values is not None:
                    h = hist.labels(r.model, r.version)
                    for v in values.tolist():
                        h.observe(v)

    def observe_request(self, endpoint: str, status: int, version: str, started: float) -> None:
        self.requests.labels(endpoint, str(status), version).inc()
        self.duration.labels(endpoint).observe(time.perf_counter() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)
