"""Request records: one per served image, handed to a pluggable sink off the request path.

A :class:`RequestRecord` is a plain dataclass (``to_dict`` gives JSON-ready data) so the monitoring
layer can store it without importing serving. Sinks implement :class:`RecordSink` (``write(records)``);
:class:`RecordDispatcher` runs them on a background thread behind a bounded queue, so a slow sink
never adds latency to a request: when the queue is full, records are dropped and counted.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger("vaekit.serving")


@dataclass
class RequestRecord:
    """What one served image leaves behind. Figures are those of the response (same forward pass).

    ``time`` is the Unix time (s) the request arrived; ``latency_s`` the service time of its
    request (queueing + batch + split), the same for every image of a request (0 for a rejected
    one); ``index`` the image's position in its request. Stats a family or endpoint does not
    produce, and every model figure of a rejected image, are None.
    """

    time: float
    request_id: str
    model: str
    version: str
    endpoint: str
    latency_s: float
    route: str = "production"  # production | canary | shadow (a shadow record shares its request id)
    accepted: bool = True  # the data-quality gate's verdict; a rejected image never reached the model
    reason: str | None = None  # why the gate rejected it (vaekit.monitoring.gate.REASONS, or request_rejected)
    pixel_mean: float | None = None  # the image's mean intensity (the gate computes it)
    pixel_var: float | None = None  # its population pixel variance, squared intensity
    index: int = 0
    batch_size: int = 1  # images in the batch the model ran (after micro-batching)
    recon_mse: float | None = None  # per-pixel MSE, squared intensity
    recon_nats: float | None = None  # -log p(x|z = posterior mean), nats per image
    kl: float | None = None  # KL(q(z|x) || p(z)), nats (families that define an ELBO)
    latent_norm: float | None = None  # ||posterior mean|| (VQ-VAE: mean ||z_e|| over grid cells)
    latent: list[float] | None = None  # posterior mean (D,) (None for VQ-VAE)
    codes: list[list[int]] | None = None  # VQ-VAE code indices (h, w)
    verdicts: dict[str, bool | None] = field(default_factory=dict)  # see ModelService: None = no profile

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (lists, floats, strings, None)."""
        return asdict(self)


@runtime_checkable
class RecordSink(Protocol):
    """Receives records in batches, on the dispatcher's thread (never on a request's)."""

    def write(self, records: list[RequestRecord]) -> None: ...


class CountingSink:
    """Counts records by (model, version, endpoint); keeps the last ``keep`` records for inspection."""

    def __init__(self, keep: int = 1000):
        self.keep = keep
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self.last: list[RequestRecord] = []
        self._lock = threading.Lock()

    def write(self, records: list[RequestRecord]) -> None:
        with self._lock:
            for r in records:
                self.counts[(r.model, r.version, r.endpoint)] += 1
            self.last = (self.last + records)[-self.keep:]

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())


class JsonlSink:
    """Appends each record as one JSON line to ``path`` (flushed per batch of records).

    Lines are appended with one ``write`` call per batch, so a reader never sees half a line
    unless the process dies mid-write; the monitoring store is the durable option.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, records: list[RequestRecord]) -> None:
        text = "".join(json.dumps(r.to_dict(), allow_nan=False) + "\n" for r in records)
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()


class TeeSink:
    """Writes every batch to each of ``sinks`` in turn (e.g. the record store and a JSON-lines file);
    a sink that raises does not keep the batch from the others (the first error is re-raised after)."""

    def __init__(self, *sinks: RecordSink):
        self.sinks = [s for s in sinks if s is not None]

    def write(self, records: list[RequestRecord]) -> None:
        error: Exception | None = None
        for s in self.sinks:
            try:
                s.write(records)
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error

    def close(self) -> None:
        for s in self.sinks:
            close = getattr(s, "close", None)
            if close is not None:
                close()


class RecordDispatcher:
    """Hands records to a sink on a daemon thread. ``submit`` never blocks and never wakes the
    thread (a deque append): the thread drains the queue every ``interval_s`` seconds, so a busy
    server pays no thread switch per request. A full queue (``max_queue`` items) drops the records
    (``dropped`` counts them) rather than slowing requests down. A sink that raises is logged and
    counted in ``errors``; the service keeps serving. Drops are logged (a warning at the first, then
    at most one every ``log_every_s`` seconds with the running total), never silent.

    ``interval_s`` bounds what a crash (SIGKILL) loses: the records of the last ``interval_s``
    seconds plus those of the batch being written; ``close`` writes everything queued. The default,
    10 ms, keeps each write small: on 2 cores a 50 ms batch (about 50 records at 1,000 requests/s)
    took a core for long enough to raise batch-1 p99 at 1 client from 1.5 to 5.1 ms; 10 ms writes: 2.3 ms
    (bench/serve_records.py)."""

    def __init__(self, sink: RecordSink, max_queue: int = 10_000, interval_s: float = 0.01,
                 log_every_s: float = 10.0):
        self.sink, self.max_queue, self.interval_s = sink, max_queue, interval_s
        self.log_every_s = log_every_s
        self._last_drop_log = -float("inf")
        self._flush_lock = threading.Lock()
        self.dropped = 0
        self.errors = 0
        self.written = 0
        self._items: deque[Any] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vaekit-records", daemon=True)
        self._thread.start()

    def submit(self, records: list[RequestRecord] | Callable[[], list[RequestRecord]]) -> None:
        """Queue records, or a function that builds them (run on the dispatcher thread, so the
        tensor-to-list work stays off the request path too)."""
        if len(self._items) >= self.max_queue:
            self.dropped += len(records) if isinstance(records, list) else 1
            now = time.monotonic()
            if now - self._last_drop_log >= self.log_every_s:
                self._last_drop_log = now
                log.warning("request-record queue full (%d items): %d record batches dropped so far; the sink "
                            "%r is slower than the traffic", self.max_queue, self.dropped, self.sink)
            return
        self._items.append(records)  # atomic under the GIL: no lock, no wake-up

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()
        self.flush()

    def flush(self) -> None:
        """Build and write everything queued so far (the thread calls it; tests and close may too).
        The records of one queued item (one model batch, or one rejected request) always go into the
        same write, so a crash never stores part of a request."""
        with self._flush_lock:
            batch: list[RequestRecord] = []
            while self._items:
                batch.extend(self._build(self._items.popleft()))
                if len(batch) >= 4096:
                    self._write(batch)
                    batch = []
            self._write(batch)

    @property
    def pending(self) -> int:
        """Queued items not yet handed to the sink."""
        return len(self._items)

    def _build(self, item: Any) -> list[RequestRecord]:
        if isinstance(item, list):
            return item
        try:
            return item()
        except Exception:
            self.errors += 1
            log.exception("building request records failed")
            return []

    def _write(self, batch: list[RequestRecord]) -> None:
        if not batch:
            return
        try:
            self.sink.write(batch)
            self.written += len(batch)
        except Exception:  # a broken sink must not stop serving
            self.errors += 1
            log.exception("record sink %r failed on %d records", self.sink, len(batch))

    def close(self, timeout: float = 60.0) -> None:
        """Write what is queued, then stop the thread (waiting up to ``timeout`` seconds for it; what
        is still queued after that is logged as lost)."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive() or self._items:
            log.error("record dispatcher: %d queued record batches were not written within %.0f s of shutdown",
                      len(self._items), timeout)
