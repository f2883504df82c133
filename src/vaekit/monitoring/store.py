"""The durable record store: one row per served image, and the alert events, in SQL.

SQLite (WAL, beside the registry) is the embedded default; PostgreSQL lets several service
processes or machines write to one store. Both go through :mod:`vaekit.db` (SQLAlchemy Core), so
nothing here switches on the dialect. A :class:`RecordStore` is a record sink: the service's
background dispatcher calls :meth:`RecordStore.write` with batches (one transaction per batch,
``executemany``), never on a request's thread.

Queries: :meth:`~RecordStore.window` (by model, version, route and time) returns the per-image
arrays the drift detectors score (:class:`vaekit.monitoring.reference.Window`);
:meth:`~RecordStore.rollups` gives 5-minute buckets (count, means, p99 of the reconstruction
error, gate rejections); :meth:`~RecordStore.join` puts the production and shadow records of one
request id side by side; :meth:`~RecordStore.retain` deletes rows older than a retention period.

The capture index (``monitor_captures``): one row per image shard the service's request capture
wrote (:mod:`vaekit.serving.capture`), with its path, image count, the arrival times of its first
and last image, model and version, so a pipeline can list the shards of a time window
(:meth:`~RecordStore.captures`) and retention can delete old ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import fields, is_dataclass
from typing import Any

import numpy as np
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
)

from vaekit.db import make_engine, reader, run_with_retry
from vaekit.errors import InputError, VaekitError, describe
from vaekit.monitoring.detectors import GateCounts
from vaekit.monitoring.reference import Window

SCHEMA_VERSION = 1
metadata = MetaData()

schema_table = Table(
    "monitor_schema", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("version", Integer, nullable=False),
)

records = Table(
    "monitor_records", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", Float, nullable=False),  # Unix seconds the request arrived
    Column("request_id", String(128), nullable=False),
    Column("idx", Integer, nullable=False, default=0),  # the image's position in its request
    Column("model", String(128), nullable=False),
    Column("version", String(64), nullable=False),
    Column("route", String(16), nullable=False, default="production"),  # production | canary | shadow
    Column("endpoint", String(32), nullable=False),
    Column("latency_s", Float, nullable=True),
    Column("batch_size", Integer, nullable=True),
    Column("recon_mse", Float, nullable=True),
    Column("recon_nats", Float, nullable=True),
    Column("kl", Float, nullable=True),
    Column("latent_norm", Float, nullable=True),
    Column("latent", JSON, nullable=True),  # (D,) posterior mean
    Column("accepted", Boolean, nullable=False, default=True),  # the data-quality gate's verdict
    Column("reason", Text, nullable=True),  # why the gate rejected it
    Column("pixel_mean", Float, nullable=True),
    Column("pixel_var", Float, nullable=True),
    Column("verdicts", JSON, nullable=True),  # the profile's per-image verdicts (recon above p99, ...)
    Index("ix_monitor_records_mvrt", "model", "version", "route", "time"),
    Index("ix_monitor_records_request", "request_id"),
)

alerts = Table(
    "monitor_alerts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", String(32), nullable=False),  # ISO 8601 UTC
    Column("model", String(128), nullable=False),
    Column("version", String(64), nullable=False),
    Column("rule", String(128), nullable=False),
    Column("status", String(16), nullable=False),  # firing | resolved
    Column("doc", JSON, nullable=False),  # the whole Alert.to_dict()
    Index("ix_monitor_alerts_model_at", "model", "at"),
)

# what the monitor computed per iteration, (version, route) and detector: the dashboard's drift p-values over time
results = Table(
    "monitor_results", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),  # Unix seconds: the end of the scored window
    Column("model", String(128), nullable=False),
    Column("version", String(64), nullable=False),
    Column("route", String(16), nullable=False),
    Column("detector", String(64), nullable=False),
    Column("statistic", Float, nullable=True),
    Column("p_value", Float, nullable=True),
    Column("threshold", Float, nullable=True),
    Column("drifted", Boolean, nullable=False),
    Column("n", Integer, nullable=False),
    Index("ix_monitor_results_model_at", "model", "at"),
)

# the capture index: one row per shard of captured request images (vaekit.serving.capture)
captures = Table(
    "monitor_captures", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("path", Text, nullable=False),  # the shard file (absolute path)
    Column("model", String(128), nullable=False),
    Column("version", String(64), nullable=False),
    Column("count", Integer, nullable=False),  # images in the shard
    Column("first_time", Float, nullable=False),  # Unix seconds the shard's first image arrived
    Column("last_time", Float, nullable=False),  # ... and its last
    Column("created", Float, nullable=False),  # Unix seconds the shard was written
    Index("ix_monitor_captures_model_time", "model", "first_time"),
)

# the scheduled FID job (monitoring/fid_watch.py): its calibrations and checks, per model version
fid_table = Table(
    "monitor_fid", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),  # Unix seconds
    Column("model", String(128), nullable=False),
    Column("version", String(64), nullable=False),
    Column("kind", String(16), nullable=False),  # calibration | check
    Column("n_samples", Integer, nullable=False),
    Column("fid", Float, nullable=False),  # check: the samples' FID; calibration: the baseline version's mean FID
    Column("threshold", Float, nullable=False),
    Column("drifted", Boolean, nullable=False),
    Column("doc", JSON, nullable=False),  # everything else: seeds, extractor hash, split-half FID, multiple, ...
    Index("ix_monitor_fid_model_at", "model", "at"),
)

COLUMNS = [c.name for c in records.columns if c.name != "id"]
FIELD_NAMES = {"index": "idx"}  # RequestRecord field -> column


class StoreError(VaekitError, RuntimeError):
    """The record store cannot be opened (a newer schema) or a query is malformed."""


_COLUMN_OF = {**{c: c for c in COLUMNS}, **FIELD_NAMES}  # field name -> column, for the fields stored
_REQUIRED = ("time", "request_id", "model", "version", "endpoint")
_DEFAULTS = {**dict.fromkeys(COLUMNS), "route": "production", "idx": 0, "accepted": True}
_FIGURES = ("recon_mse", "recon_nats", "kl", "latent_norm", "pixel_mean", "pixel_var", "latency_s")


def _row(record: Any) -> dict[str, Any]:
    """A table row from a RequestRecord-like object (a dataclass or a mapping with the same field names).

    Every row holds every column (executemany needs one key set per statement). This runs for every
    served image on the thread that shares the GIL (and, on 2 cores, the CPU) with the request path,
    so it reads the fields shallowly (asdict would deep-copy every float of the latent list)."""
    if is_dataclass(record) and not isinstance(record, type):
        data = {f.name: getattr(record, f.name) for f in fields(record)}
    elif isinstance(record, Mapping):
        data = record
    else:
        raise InputError(f"a record must be a dataclass or a mapping of fields, got {describe(record)}")
    row = dict(_DEFAULTS)
    for k, v in data.items():
        col = _COLUMN_OF.get(k)
        if col is not None and v is not None:
            row[col] = v
    missing = [c for c in _REQUIRED if row[c] is None]
    if missing:
        raise InputError(f"a record needs {missing}, got fields {sorted(data)}")
    for c in _FIGURES:
        v = row[c]
        if v is not None and not math.isfinite(v):
            row[c] = None  # JSON and SQL have no NaN; a non-finite figure is stored as missing
    return row


def _finite(v: Any) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


class RecordStore:
    """Request records and alert events in ``uri`` (``sqlite:///PATH`` or ``postgresql://...``)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.engine = make_engine(uri)
        self._init_schema()

    def _init_schema(self) -> None:
        def init() -> None:
            with self.engine.begin() as conn:
                metadata.create_all(conn)
                have = conn.execute(select(schema_table.c.version).where(schema_table.c.id == 1)).scalar()
                if have is None:
                    conn.execute(insert(schema_table).values(id=1, version=SCHEMA_VERSION))
                elif have > SCHEMA_VERSION:
                    raise StoreError(f"the record store at {self.uri} has schema version {have}, newer than this "
                                     f"vaekit's {SCHEMA_VERSION}; upgrade vaekit to read it")

        run_with_retry(init)

    def close(self) -> None:
        self.engine.dispose()

    # -- writing -------------------------------------------------------------------------------
    def append(self, batch: Iterable[Any]) -> int:
        """Insert the records of ``batch`` in one transaction; returns how many."""
        rows = [_row(r) for r in batch]
        if not rows:
            return 0

        def write() -> None:
            with self.engine.begin() as conn:
                conn.execute(insert(records), rows)

        run_with_retry(write)
        return len(rows)

    def write(self, batch: list[Any]) -> None:
        """The record-sink interface of the service's dispatcher."""
        self.append(batch)

    def append_alerts(self, events: Iterable[Any], model: str) -> int:
        """Store alert events (``Alert`` objects or their ``to_dict()``) of ``model``."""
        rows = []
        for e in events:
            doc = e.to_dict() if hasattr(e, "to_dict") else dict(e)
            rows.append({"at": doc["at"], "model": model, "version": str(doc.get("version", "")),
                         "rule": doc["rule"], "status": doc["status"], "doc": doc})
        if rows:
            def write() -> None:
                with self.engine.begin() as conn:
                    conn.execute(insert(alerts), rows)

            run_with_retry(write)
        return len(rows)

    def append_results(self, model: str, at: float, version: str, route: str, batch: Iterable[Any]) -> int:
        """Store the DetectorResults (or their ``to_dict()``) the monitor computed for one window ending at ``at``."""
        rows = []
        for r in batch:
            doc = r.to_dict() if hasattr(r, "to_dict") else dict(r)
            rows.append({"at": float(at), "model": model, "version": str(version), "route": str(route),
                         "detector": doc["detector"], "statistic": _finite(doc.get("statistic")),
                         "p_value": _finite(doc.get("p_value")), "threshold": _finite(doc.get("threshold")),
                         "drifted": bool(doc["drifted"]), "n": int(doc.get("n") or 0)})
        if rows:
            def write() -> None:
                with self.engine.begin() as conn:
                    conn.execute(insert(results), rows)

            run_with_retry(write)
        return len(rows)

    def append_fid(self, model: str, row: Mapping[str, Any]) -> None:
        """Store one FID calibration or check of ``model``: ``row`` has at, version, kind, n_samples, fid,
        threshold, drifted and doc (a JSON-able dict)."""
        kind = row.get("kind")
        if kind not in ("calibration", "check"):
            raise InputError(f"kind must be 'calibration' or 'check', got {describe(kind)}")
        values = {"model": model, "at": float(row["at"]), "version": str(row["version"]), "kind": kind,
                  "n_samples": int(row["n_samples"]), "fid": float(row["fid"]), "threshold": float(row["threshold"]),
                  "drifted": bool(row["drifted"]), "doc": dict(row.get("doc") or {})}

        def write() -> None:
            with self.engine.begin() as conn:
                conn.execute(insert(fid_table), [values])

        run_with_retry(write)

    def fid_rows(self, model: str, kind: str | None = None, n_samples: int | None = None) -> list[dict[str, Any]]:
        """The stored FID calibrations and checks of ``model`` (oldest first), optionally of one kind and N."""
        c = fid_table.c
        conds = [c.model == model]
        if kind is not None:
            conds.append(c.kind == kind)
        if n_samples is not None:
            conds.append(c.n_samples == int(n_samples))
        with reader(self.engine).connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(fid_table).where(*conds).order_by(c.at, c.id))]

    def retain(self, max_age_s: float, now: float | None = None) -> int:
        """Delete records older than ``max_age_s`` seconds; returns how many were deleted."""
        if isinstance(max_age_s, bool) or not isinstance(max_age_s, int | float) or max_age_s <= 0:
            raise InputError(f"max_age_s must be a positive number of seconds, got {describe(max_age_s)}")
        cutoff = (time.time() if now is None else now) - max_age_s

        def write() -> int:
            with self.engine.begin() as conn:
                return conn.execute(delete(records).where(records.c.time < cutoff)).rowcount

        return run_with_retry(write)

    # -- the capture index ---------------------------------------------------------------------
    def add_capture(self, path: str, model: str, version: str, count: int, first_time: float, last_time: float,
                    created: float | None = None) -> int:
        """Index one shard of captured images (``count`` images that arrived in [first_time, last_time],
        Unix seconds); returns the row id."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InputError(f"count must be a positive integer (images in the shard), got {describe(count)}")
        if not (math.isfinite(first_time) and math.isfinite(last_time)) or last_time < first_time:
            raise InputError(f"first_time and last_time must be finite Unix seconds with first_time <= last_time, "
                             f"got {first_time!r} and {last_time!r}")
        row = {"path": str(path), "model": str(model), "version": str(version), "count": count,
               "first_time": float(first_time), "last_time": float(last_time),
               "created": time.time() if created is None else float(created)}

        def write() -> int:
            with self.engine.begin() as conn:
                return int(conn.execute(insert(captures).values(**row)).inserted_primary_key[0])

        return run_with_retry(write)

    def captures(self, model: str | None = None, version: str | None = None, start: float | None = None,
                 end: float | None = None) -> list[dict[str, Any]]:
        """Indexed capture shards, in capture order (first image's arrival, then id), that hold images
        which arrived in [start, end): ``last_time >= start`` and ``first_time < end``."""
        c = captures.c
        conds = []
        if model is not None:
            conds.append(c.model == str(model))
        if version is not None:
            conds.append(c.version == str(version))
        if start is not None:
            conds.append(c.last_time >= float(start))
        if end is not None:
            conds.append(c.first_time < float(end))
        q = select(captures).where(*conds).order_by(c.first_time, c.id)
        with reader(self.engine).connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def delete_captures(self, ids: Iterable[int]) -> int:
        """Remove index rows by id (the caller deletes the files); returns how many were removed."""
        ids = [int(i) for i in ids]
        if not ids:
            return 0

        def write() -> int:
            with self.engine.begin() as conn:
                return conn.execute(delete(captures).where(captures.c.id.in_(ids))).rowcount

        return run_with_retry(write)

    # -- reading -------------------------------------------------------------------------------
    def _where(self, model: str | None, version: str | None, route: str | None, start: float | None,
               end: float | None, accepted: bool | None) -> list[Any]:
        c = records.c
        conds = []
        for col, v in ((c.model, model), (c.version, version), (c.route, route)):
            if v is not None:
                conds.append(col == str(v))
        if start is not None:
            conds.append(c.time >= start)
        if end is not None:
            conds.append(c.time < end)
        if accepted is not None:
            conds.append(c.accepted == accepted)
        return conds

    def rows(self, model: str | None = None, version: str | None = None, route: str | None = None,
             start: float | None = None, end: float | None = None, *, accepted: bool | None = None,
             limit: int | None = None) -> list[dict[str, Any]]:
        """Records as dicts, oldest first, filtered by model, version, route and time [start, end)."""
        q = select(records).where(*self._where(model, version, route, start, end, accepted))
        q = q.order_by(records.c.time, records.c.id)
        if limit is not None:
            q = q.limit(limit)
        with reader(self.engine).connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def count(self, model: str | None = None, version: str | None = None, route: str | None = None,
              start: float | None = None, end: float | None = None, *, accepted: bool | None = None) -> int:
        q = select(func.count()).select_from(records).where(*self._where(model, version, route, start, end,
                                                                            accepted))
        with reader(self.engine).connect() as conn:
            return int(conn.execute(q).scalar() or 0)

    def window(self, model: str, version: str | None = None, route: str | None = None,
               start: float | None = None, end: float | None = None) -> Window:
        """The accepted images' arrays over [start, end) as a drift-detector :class:`Window` (rejected
        images never reach the model, so they never enter the drift statistics)."""
        rows = self.rows(model, version, route, start, end, accepted=True)
        if not rows:
            raise InputError(f"no accepted records of {model!r} (version {version}, route {route}) in "
                             f"[{start}, {end})")
        arrays: dict[str, Any] = {"timestamps": np.array([r["time"] for r in rows])}
        for name in ("recon_mse", "recon_nats", "kl", "latent_norm", "pixel_mean", "pixel_var"):
            vals = [r[name] for r in rows]
            if all(v is not None for v in vals):
                arrays[name] = np.array(vals, dtype=np.float64)
        lat = [r["latent"] for r in rows]
        if all(v is not None for v in lat):
            arrays["latent"] = np.array(lat, dtype=np.float64)
        return Window(**arrays)

    def gate_counts(self, model: str, version: str | None = None, route: str | None = None,
                    start: float | None = None, end: float | None = None) -> GateCounts:
        """The gate's verdicts on the images of [start, end): how many, how many refused, and per reason."""
        c = records.c
        q = (select(c.accepted, c.reason, func.count()).select_from(records)
             .where(*self._where(model, version, route, start, end, None)).group_by(c.accepted, c.reason))
        n, by_reason = 0, {}
        with reader(self.engine).connect() as conn:
            for accepted, reason, count in conn.execute(q):
                n += int(count)
                if not accepted:
                    key = str(reason or "unknown")
                    by_reason[key] = by_reason.get(key, 0) + int(count)
        return GateCounts(n, sum(by_reason.values()), by_reason)

    def rollups(self, model: str, period_s: float = 300.0, start: float | None = None,
                end: float | None = None) -> list[dict[str, Any]]:
        """Per ``period_s`` bucket (default 5 minutes), version and route: request count, gate rejections,
        means of recon error / KL / latent norm and the p99 of the recon error (oldest bucket first)."""
        if isinstance(period_s, bool) or not isinstance(period_s, int | float) or period_s <= 0:
            raise InputError(f"period_s must be a positive number of seconds, got {describe(period_s)}")
        groups: dict[tuple[float, str, str], list[dict[str, Any]]] = {}
        for r in self.rows(model, start=start, end=end):
            key = (math.floor(r["time"] / period_s) * period_s, r["version"], r["route"])
            groups.setdefault(key, []).append(r)
        out = []
        for (bucket, version, route), rs in sorted(groups.items()):
            ok = [r for r in rs if r["accepted"]]
            row: dict[str, Any] = {"start": bucket, "version": version, "route": route, "n": len(rs),
                                   "rejected": len(rs) - len(ok)}
            for name in ("recon_mse", "kl", "latent_norm", "latency_s"):
                vals = [r[name] for r in ok if r[name] is not None]
                row[f"{name}_mean"] = float(np.mean(vals)) if vals else None
            mse = [r["recon_mse"] for r in ok if r["recon_mse"] is not None]
            row["recon_mse_p99"] = float(np.quantile(mse, 0.99)) if mse else None
            out.append(row)
        return out

    def join(self, request_id: str) -> dict[str, list[dict[str, Any]]]:
        """Every record of one request id, by route (production, canary, shadow)."""
        with reader(self.engine).connect() as conn:
            rs = conn.execute(select(records).where(records.c.request_id == request_id)
                              .order_by(records.c.route, records.c.idx))
            out: dict[str, list[dict[str, Any]]] = {}
            for r in rs:
                out.setdefault(r.route, []).append(dict(r._mapping))
        return out

    def versions(self, model: str, start: float | None = None, end: float | None = None) -> list[tuple[str, str]]:
        """The (version, route) pairs of ``model`` with records in [start, end), sorted."""
        q = select(records.c.version, records.c.route).where(*self._where(model, None, None, start, end, None))
        q = q.group_by(records.c.version, records.c.route)
        with reader(self.engine).connect() as conn:
            return sorted((str(v), str(r)) for v, r in conn.execute(q))

    def results(self, model: str, start: float | None = None, end: float | None = None) -> list[dict[str, Any]]:
        """The monitor's stored detector results of ``model`` with ``at`` in [start, end), oldest first."""
        c = results.c
        conds = [c.model == model]
        if start is not None:
            conds.append(c.at >= start)
        if end is not None:
            conds.append(c.at < end)
        q = select(results).where(*conds).order_by(c.at, c.id)
        with reader(self.engine).connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def alert_events(self, model: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Stored alert events (newest last)."""
        q = select(alerts.c.doc).order_by(alerts.c.at, alerts.c.id)
        if model is not None:
            q = q.where(alerts.c.model == model)
        with reader(self.engine).connect() as conn:
            docs = [r[0] for r in conn.execute(q)]
        return docs[-limit:]
