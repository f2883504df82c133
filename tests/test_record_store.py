"""The monitoring record store on SQLite and on the real PostgreSQL server."""

import multiprocessing as mp
from dataclasses import dataclass, field

import numpy as np
import pytest
from sqlalchemy import update

from vaekit.errors import InputError
from vaekit.monitoring.store import RecordStore, StoreError, schema_table

FORK = mp.get_context("fork")
T0 = 1_700_000_100.0  # a multiple of 300 s: rollup buckets start at T0


@dataclass
class Rec:  # the fields of vaekit.serving.records.RequestRecord that the store keeps
    time: float
    request_id: str
    model: str
    version: str
    endpoint: str
    latency_s: float = 0.001
    index: int = 0
    route: str = "production"
    recon_mse: float | None = None
    kl: float | None = None
    latent_norm: float | None = None
    latent: list | None = None
    accepted: bool = True
    reason: str | None = None
    verdicts: dict = field(default_factory=dict)


def _records(n, rng, version="1", route="production", t0=T0, step=1.0, prefix="r"):
    lat = rng.normal(size=(n, 3))
    return [Rec(time=t0 + i * step, request_id=f"{prefix}{i}", model="mnist", version=version, endpoint="score",
                route=route, recon_mse=float(rng.gamma(2, 0.01)), kl=float(rng.gamma(20, 1)),
                latent_norm=float(np.linalg.norm(lat[i])), latent=lat[i].tolist()) for i in range(n)]


def test_append_window_rollups_join_and_retention(db_uri):
    rng = np.random.default_rng(0)
    store = RecordStore(db_uri)
    prod = _records(900, rng)  # 15 minutes at 1 request/s
    shadow = [Rec(**{**r.__dict__, "version": "2", "route": "shadow", "recon_mse": r.recon_mse * 1.1})
              for r in prod[:50]]
    black = Rec(time=T0 + 5, request_id="bad", model="mnist", version="1", endpoint="score", accepted=False,
                reason="low_variance: pixel variance 0 < 0.01")
    assert store.append(prod) == 900 and store.append(shadow) == 50 and store.append([black]) == 1
    w = store.window("mnist", version="1", route="production", start=T0, end=T0 + 300)
    assert len(w) == 300 and w.latent.shape == (300, 3)  # the rejected image is not in the drift window
    assert np.allclose(w.recon_mse, [r.recon_mse for r in prod[:300]])
    assert store.count("mnist", accepted=False) == 1 and store.count("mnist") == 951
    roll = [r for r in store.rollups("mnist", period_s=300) if r["route"] == "production"]
    assert [r["n"] for r in roll] == [301, 300, 300] and roll[0]["rejected"] == 1
    first = [r.recon_mse for r in prod[:300]]
    assert roll[0]["recon_mse_mean"] == pytest.approx(np.mean(first))
    assert roll[0]["recon_mse_p99"] == pytest.approx(np.quantile(first, 0.99))
    joined = store.join("r7")
    assert set(joined) == {"production", "shadow"}
    assert joined["shadow"][0]["recon_mse"] == pytest.approx(joined["production"][0]["recon_mse"] * 1.1)
    assert store.retain(200, now=T0 + 600) == 400 + 1 + 50  # older than T0 + 400 (shadow rows are at T0..T0+49)
    assert store.count("mnist") == 500
    with pytest.raises(InputError, match="no accepted records"):
        store.window("mnist", version="9")
    with pytest.raises(InputError, match="needs"):
        store.append([{"time": T0, "model": "m"}])
    store.close()


def _writer(uri, k):
    store = RecordStore(uri)
    rng = np.random.default_rng(k)
    for j in range(10):  # 10 batches of 50, as the service's dispatcher writes them
        store.append(_records(50, rng, prefix=f"p{k}-{j}-"))
    store.close()


def test_two_processes_writing_at_once_lose_nothing(db_uri):
    RecordStore(db_uri).close()  # create the tables once
    procs = [FORK.Process(target=_writer, args=(db_uri, k)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = RecordStore(db_uri)
    assert store.count("mnist") == 1000
    assert len({r["request_id"] for r in store.rows("mnist")}) == 1000
    store.close()


def test_a_newer_schema_is_refused(db_uri):
    store = RecordStore(db_uri)
    with store.engine.begin() as conn:
        conn.execute(update(schema_table).values(version=99))
    store.close()
    with pytest.raises(StoreError, match="schema version 99"):
        RecordStore(db_uri)


def test_alert_events_are_stored_and_read_back(db_uri):
    store = RecordStore(db_uri)
    ev = {"rule": "latent_ks", "status": "firing", "version": "1", "at": "2026-12-01T10:00:00Z", "value": 0.3}
    assert store.append_alerts([ev, {**ev, "status": "resolved", "at": "2026-12-01T10:05:00Z"}], model="mnist") == 2
    assert [e["status"] for e in store.alert_events("mnist")] == ["firing", "resolved"]
    store.close()


def test_rows_match_a_deep_copy_of_the_record_and_reject_what_lacks_a_key():
    from dataclasses import asdict

    from vaekit.monitoring.store import COLUMNS, _row
    from vaekit.serving.records import RequestRecord

    rec = RequestRecord(time=T0, request_id="r1", model="m", version="3", endpoint="score", latency_s=0.002,
                        index=4, recon_mse=float("nan"), kl=12.5, latent=[0.25, -1.0], verdicts={"recon_p99": True})
    row = _row(rec)
    expected = {("idx" if k == "index" else k): v for k, v in asdict(rec).items()}  # the deep copy, independently
    expected["recon_mse"] = None  # NaN is stored as missing
    assert set(row) == set(COLUMNS)
    assert {c: row[c] for c in COLUMNS} == {c: expected.get(c) for c in COLUMNS}
    assert _row({**asdict(rec), "route": None})["route"] == "production"  # a missing route means production
    with pytest.raises(InputError, match="request_id"):
        _row({"time": T0, "model": "m", "version": "1", "endpoint": "score"})
    with pytest.raises(InputError, match="dataclass or a mapping"):
        _row(RequestRecord)
