"""Request capture in the service: which requests are kept (a hash of the request id, only what the gate
accepted on production), the shards and their index in the record store (SQLite and PostgreSQL), rotation,
retention, reading a time window back, and a real ``vaekit serve --capture-dir`` process that writes its
buffer on SIGTERM."""

from __future__ import annotations

import signal
import time

import httpx
import numpy as np
import pytest
import torch
from test_serving import images, npy, save_model
from test_serving_load import free_port, start_server

from vaekit.data.shards import load_shards, read_shard
from vaekit.deploy.routing import RoutingPolicy
from vaekit.errors import ConfigError, InputError
from vaekit.monitoring.store import RecordStore
from vaekit.registry import ModelRegistry
from vaekit.serving import ModelService
from vaekit.serving.capture import Capture, load_captures
from vaekit.serving.service import GateRejectedError

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def as_uint8(x: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(x).clamp(0, 1) * 255).round().to(torch.uint8)


def test_selection_is_a_stable_hash_of_the_request_id_at_the_configured_share(tmp_path):
    store = RecordStore(f"sqlite:///{tmp_path / 'm.db'}")
    a, b = Capture(tmp_path / "a", store, share=0.1), Capture(tmp_path / "b", store, share=0.1)
    ids = [f"req-{i}" for i in range(20_000)]
    picked = [a.selected(i) for i in ids]
    assert picked == [b.selected(i) for i in ids]  # the same in every Capture (and process: unit_hash's test)
    assert abs(np.mean(picked) - 0.1) < 4 * np.sqrt(0.1 * 0.9 / len(ids))
    # independent of the canary draw: about 10% of the canary's keys are captured too (were it the same
    # hash and salt, none of the 5% would escape being captured)
    canary = [i for i in ids if RoutingPolicy().route(i) == "canary"]
    assert 0.05 < np.mean([a.selected(i) for i in canary]) < 0.16
    assert not any(Capture(tmp_path / "c", store, share=0.0).selected(i) for i in ids[:100])
    assert all(Capture(tmp_path / "d", store, share=1.0).selected(i) for i in ids[:100])


@pytest.mark.parametrize("kwargs, fragment", [({"share": 1.5}, "share must be a number in [0, 1], got 1.5"),
                                              ({"shard_images": 0}, "shard_images must be a positive integer"),
                                              ({"max_age_s": -1}, "max_age_s must be a positive number")])
def test_bad_settings_raise_config_errors_naming_the_value(tmp_path, kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        Capture(tmp_path / "cap", RecordStore(f"sqlite:///{tmp_path / 'm.db'}"), **kwargs)


def test_a_capture_folder_without_a_store_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="needs a record store"):
        ModelService(save_model(tmp_path / "vae"), capture=tmp_path / "cap")


def test_the_service_captures_accepted_production_images_into_indexed_rotating_shards(db_uri, tmp_path):
    store = RecordStore(db_uri)
    cap = Capture(tmp_path / "cap", store, share=1.0, shard_images=4)
    svc = ModelService(save_model(tmp_path / "vae"), store=store, capture=cap, max_wait_ms=0).start()
    sent = []
    try:
        for i in range(5):
            x = images(2, seed=i)
            svc.score(x, request_id=f"r{i}")
            sent.append(as_uint8(x))
        with pytest.raises(GateRejectedError):  # a black image: refused, recorded, never captured
            svc.score(np.zeros((1, 1, 28, 28), np.float32), request_id="black")
        svc.decode(np.zeros((1, 4), np.float32), request_id="dec")  # no input image to keep
        svc.flush_records()
        assert cap.shards == 2 and cap.pending == 2  # 4 + 4 images written, 2 buffered
    finally:
        svc.close()  # writes the buffer
    rows = store.captures("vae")
    assert [r["count"] for r in rows] == [4, 4, 2] and all(r["version"] == svc.version for r in rows)
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)  # name order is capture order
    got = load_shards(tmp_path / "cap")
    assert torch.equal(got.images, torch.cat(sent)) and (got.labels == -1).all()
    with np.load(rows[0]["path"]) as doc:
        assert list(doc["request_ids"]) == ["r0", "r0", "r1", "r1"]
        assert np.all(np.diff(doc["times"]) >= 0)
    assert svc.describe()["capture"]["written"] == 10


def test_only_the_share_of_request_ids_is_captured_and_not_the_canary(tmp_path):
    reg = ModelRegistry(f"sqlite:///{tmp_path / 'reg.db'}", artifact_root=tmp_path / "artifacts")
    for seed in (0, 1):
        reg.register(save_model(tmp_path / f"m{seed}", seed=seed), "digits", reason="test", profile=False)
    reg.set_alias("digits", "production", 1, reason="first")
    reg.set_alias("digits", "canary", 2, reason="try 2")
    store = RecordStore(f"sqlite:///{tmp_path / 'm.db'}")
    svc = ModelService("digits@production", registry=reg, store=store, capture=tmp_path / "cap", capture_share=0.3,
                       routing=RoutingPolicy(canary_share=0.3), max_wait_ms=0).start()
    cap = svc.capture
    ids = [f"id{i}" for i in range(200)]
    routes = {}
    with svc:
        for rid in ids:
            routes[rid] = svc.score(images(1, seed=1), request_id=rid).route
    kept = [rid for rid in ids if routes[rid] == "production" and cap.selected(rid)]
    assert 0 < len(kept) < len(ids) and "canary" in routes.values()
    with np.load(store.captures("digits")[0]["path"]) as doc:
        assert list(doc["request_ids"]) == kept
    assert all(r["version"] == "1" for r in store.captures("digits"))


def test_retention_deletes_old_shards_and_their_index_rows(tmp_path):
    store = RecordStore(f"sqlite:///{tmp_path / 'm.db'}")
    cap = Capture(tmp_path / "cap", store, share=1.0, shard_images=3, max_images=7, max_age_s=100.0)
    x = torch.rand(1, 1, 28, 28)
    t0 = time.time()
    for i in range(12):  # four shards of 3; at most 7 images kept: the two oldest shards go
        cap.offer("m", "1", f"r{i}", x, t0 + i)
    assert [r["count"] for r in store.captures()] == [3, 3] and cap.deleted == 2
    assert len(list((tmp_path / "cap").glob("*.npz"))) == 2
    removed = cap.retain(now=t0 + 9 + 100.5)  # the shard of images 6..8 is older than 100 s now
    assert [r["first_time"] for r in removed] == [t0 + 6]
    assert [r["first_time"] for r in store.captures()] == [t0 + 9]
    assert len(list((tmp_path / "cap").glob("*.npz"))) == 1


def test_a_time_window_reads_exactly_the_images_that_arrived_in_it(tmp_path):
    store = RecordStore(f"sqlite:///{tmp_path / 'm.db'}")
    cap = Capture(tmp_path / "cap", store, share=1.0, shard_images=4)
    t0 = 1_700_000_000.0
    for i in range(10):
        cap.offer("m", "1", f"r{i}", torch.full((1, 1, 28, 28), i / 255), t0 + i)
    cap.flush()
    got = load_captures(store, tmp_path / "cap", model="m", start=t0 + 3, end=t0 + 7)
    assert got.images[:, 0, 0, 0].tolist() == [3, 4, 5, 6]  # in capture order, across shard boundaries
    assert len(load_captures(store, tmp_path / "cap")) == 10
    with pytest.raises(InputError, match="no captured images of model 'other'"):
        load_captures(store, tmp_path / "cap", model="other")
    assert len(read_shard(store.captures()[0]["path"])) == 4


def test_vaekit_serve_capture_dir_writes_its_buffer_on_sigterm(tmp_path):
    model = save_model(tmp_path / "vae")
    uri = f"sqlite:///{tmp_path / 'mon' / 'records.db'}"
    port = free_port()
    proc = start_server(model, port, "--store", uri, "--capture-dir", str(tmp_path / "cap"), "--capture-share", "0.5")
    try:
        for i in range(40):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/models/vae/score", content=npy(images(1, seed=i)),
                           headers={"content-type": "application/x-npy", "x-request-id": f"q{i}"})
            assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode in (0, -signal.SIGTERM), out
    probe = Capture(tmp_path / "probe", RecordStore(uri), share=0.5)
    expected = [f"q{i}" for i in range(40) if probe.selected(f"q{i}")]
    rows = RecordStore(uri).captures("vae")
    assert sum(r["count"] for r in rows) == len(expected) > 0  # nothing buffered was lost at shutdown
    with np.load(rows[0]["path"]) as doc:
        assert list(doc["request_ids"]) == expected


def test_a_pipeline_window_needs_the_store_and_a_forward_interval():
    from vaekit.cli.retrain import parse_time
    from vaekit.deploy.pipelines import PipelineConfig

    with pytest.raises(ConfigError, match="give store"):
        PipelineConfig(kind="emergency", name="m", data="capture", since=1.0)
    with pytest.raises(ConfigError, match="until must be later than since"):
        PipelineConfig(kind="emergency", name="m", data="capture", store="sqlite:///x.db", since=5.0, until=5.0)
    assert parse_time("2026-12-01T11:00:00Z", "--since") == parse_time("2026-12-01T11:00:00", "--since") == 1796122800.0
    with pytest.raises(ConfigError, match="--since must be Unix seconds or an ISO 8601 time.*'yesterday'"):
        parse_time("yesterday", "--since")


def test_a_pipeline_started_before_the_window_settings_existed_continues(tmp_path):
    import json
    from dataclasses import asdict

    from vaekit.deploy.pipelines import Pipeline, PipelineConfig, PipelineError

    reg = ModelRegistry(f"sqlite:///{tmp_path / 'reg.db'}")
    cfg = PipelineConfig(kind="emergency", name="m", data="capture", out=str(tmp_path / "pipes"))
    old = json.loads(json.dumps(asdict(cfg), default=str))
    for key in ("store", "since", "until"):  # what a pipeline.json written before them holds
        del old[key]
    cfg.folder.mkdir(parents=True)
    (cfg.folder / "pipeline.json").write_text(json.dumps({"config": old, "steps": {"validate": {"summary": "x"}}}))
    assert Pipeline(cfg, reg).state["steps"] == {"validate": {"summary": "x"}}
    with pytest.raises(PipelineError, match="other settings"):
        Pipeline(PipelineConfig(kind="emergency", name="m", data="capture", out=str(tmp_path / "pipes"),
                                store="sqlite:///x.db"), reg)
