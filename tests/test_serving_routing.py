"""Routing in the service: production + canary by a hash of the request id or the client key
(``vaekit.deploy.routing.RoutingPolicy``), both followed as registry aliases move (including
``apply_decision`` removing the canary), and a shadow fed a copy of each request off the request
path: its records share the request id (``RecordStore.join``), and a shadow that raises or
hangs changes neither the status nor the latency of production responses."""

from __future__ import annotations

import math
import os
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from test_serving import images, npy, save_model

from vaekit.deploy.apply import apply_decision
from vaekit.deploy.policy import Decision
from vaekit.deploy.routing import RoutingPolicy
from vaekit.errors import ConfigError
from vaekit.models import load_model
from vaekit.monitoring.store import RecordStore
from vaekit.registry import ModelRegistry
from vaekit.serving import Loaded, ModelService, create_app

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture
def registry(db_uri, tmp_path):
    reg = ModelRegistry(db_uri, artifact_root=tmp_path / "artifacts", actor="tester@ci")
    for seed in (0, 1, 2):
        reg.register(save_model(tmp_path / f"m{seed}", seed=seed), "mnist", reason="test", profile=False)
    reg.set_alias("mnist", "production", 1, reason="first")
    reg.set_alias("mnist", "canary", 2, reason="try 2")
    yield reg
    reg.close()


def test_the_canary_share_is_within_binomial_error_and_matches_the_policy(registry):
    policy = RoutingPolicy(canary_share=0.2)
    n = 1000
    with ModelService("mnist@production", registry=registry, routing=policy, shadow=False) as svc:
        assert svc.canary is not None and svc.canary.version == "2"
        x = images(1)
        routes = {}
        for i in range(n):
            r = svc.score(x, request_id=f"req-{i}")
            routes[f"req-{i}"] = r.route
            assert r.version == {"production": "1", "canary": "2"}[r.route]
    k = sum(v == "canary" for v in routes.values())
    sd = math.sqrt(n * 0.2 * 0.8)
    assert abs(k - n * 0.2) <= 4 * sd, k  # 4 sigma: a false failure about once in 16,000 runs
    assert all(routes[rid] == policy.route(rid) for rid in routes)  # the service routes as the pure function


def test_a_client_key_pins_a_client_to_one_route_over_http(registry):
    svc = ModelService("mnist@production", registry=registry, routing=RoutingPolicy(canary_share=0.5), shadow=False)
    with TestClient(create_app(svc)) as c:
        body = npy(images(1))
        for key in ("alice", "bob", "carol", "dave"):
            want = RoutingPolicy(canary_share=0.5).route(key)
            seen = set()
            for _ in range(5):
                r = c.post("/v1/models/mnist/score", content=body,
                           headers={"content-type": "application/x-npy", "x-client-key": key})
                assert r.status_code == 200
                seen.add((r.headers["x-model-route"], r.headers["x-model-version"], r.json()["route"]))
            assert seen == {(want, "2" if want == "canary" else "1", want)}
        info = c.get("/v1/models/mnist").json()["routing"]
        assert info["canary"] == "2" and info["canary_share"] == 0.5


def test_canary_alias_moves_and_removal_by_apply_decision_are_followed(registry):
    with ModelService("mnist@production", registry=registry, routing=RoutingPolicy(canary_share=0.5),
                      shadow=False, poll_interval_s=0.05) as svc:
        registry.set_alias("mnist", "canary", 3, reason="try 3")
        deadline = time.monotonic() + 20
        while (svc.canary is None or svc.canary.version != "3") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert svc.canary.version == "3"
        versions = {svc.score(images(1), request_id=f"a{i}").version for i in range(40)}
        assert versions == {"1", "3"}
        apply_decision(registry, "mnist", Decision("rollback", ["canary worse"], {"ratio": 1.1}))
        deadline = time.monotonic() + 20
        while svc.canary is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert svc.canary is None
        results = [svc.score(images(1), request_id=f"b{i}") for i in range(40)]
        assert {(r.route, r.version) for r in results} == {("production", "1")}


def test_shadow_records_join_production_ones_by_request_id(registry, tmp_path):
    registry.set_alias("mnist", "shadow", 3, reason="shadow 3")
    store = RecordStore(f"sqlite:///{tmp_path / 'records.db'}")
    x = images(2, seed=5)
    with ModelService("mnist@production", registry=registry, canary=False, store=store) as svc:
        assert svc.shadow.version == "3"
        for i in range(10):
            r = svc.score(x, request_id=f"s{i}")
            assert r.route == "production" and r.version == "1"
        deadline = time.monotonic() + 20
        while svc.shadow_served < 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert svc.shadow_served == 10 and svc.shadow_dropped == 0 and svc.shadow_errors == 0
    joined = store.join("s4")
    assert sorted(joined) == ["production", "shadow"]
    assert [r["version"] for r in joined["shadow"]] == ["3", "3"] and [r["idx"] for r in joined["shadow"]] == [0, 1]
    # the shadow's figures are version 3's own, computed independently here
    ins = load_model(registry.get("mnist/3").artifact_path).eval().inspect(torch.from_numpy(x))
    assert [r["recon_nats"] for r in joined["shadow"]] == pytest.approx(ins.recon_nats.tolist(), rel=1e-5)
    assert [r["pixel_var"] for r in joined["shadow"]] == [r["pixel_var"] for r in joined["production"]]
    assert store.count(route="shadow") == 20 and store.count(route="production") == 20
    store.close()


class BrokenShadow:
    """A shadow source whose model raises, or blocks until released, once ``armed`` (after warm-up)."""

    follows = False
    name = "mnist"
    reference = "broken-shadow"

    def __init__(self, folder, mode: str):
        self.folder, self.mode = folder, mode
        self.armed = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def current_version(self) -> str:
        return "shadow-x"

    def load(self, device):
        model = load_model(self.folder, map_location=device)
        inner = model.inspect

        def inspect(x, y=None, **kw):
            if self.armed.is_set():
                self.calls += 1
                if self.mode == "raise":
                    raise RuntimeError("the shadow is broken")
                self.release.wait(30)
            return inner(x, y, **kw)

        model.inspect = inspect
        return Loaded(model, "shadow-x")


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_a_shadow_that_raises_or_hangs_does_not_touch_production(tmp_path, mode):
    folder = save_model(tmp_path / "m")
    shadow = BrokenShadow(folder, mode)
    svc = ModelService(folder, shadow=shadow, shadow_queue=8)
    with TestClient(create_app(svc)) as c:
        shadow.armed.set()
        body = npy(images(1))
        latencies = []
        for _ in range(60):
            t0 = time.perf_counter()
            r = c.post("/v1/models/m/score", content=body, headers={"content-type": "application/x-npy"})
            latencies.append(time.perf_counter() - t0)
            assert r.status_code == 200 and r.headers["x-model-route"] == "production"
        time.sleep(0.3)
        if mode == "raise":
            assert svc.shadow_errors > 0 and svc.shadow_served == 0
        else:  # one batch stuck in the shadow, 8 queued behind it, the rest dropped and counted
            assert svc.shadow_dropped >= 60 - 8 - svc.max_batch_size
            metrics = c.get("/metrics").text
            assert f"vaekit_shadow_dropped_total{{model=\"m\"}} {float(svc.shadow_dropped)}" in metrics
        # a hung shadow never holds a production request: none took anywhere near the 30 s hang
        assert max(latencies) < 5.0, max(latencies)
        shadow.release.set()


def test_no_canary_or_shadow_for_a_folder_or_a_pinned_version(registry, tmp_path):
    folder = save_model(tmp_path / "f")
    with ModelService(folder) as svc:
        assert svc.canary is None and svc.shadow is None
        assert svc.describe()["routing"]["canary_source"] is None
    with ModelService("mnist/1", registry=registry) as svc:
        assert svc.canary is None and svc.describe()["routing"]["canary_source"] is None
    assert np.isfinite(svc.describe()["routing"]["canary_share"])


def test_the_shadow_share_mirrors_exactly_the_requests_the_policy_picks(registry):
    registry.set_alias("mnist", "shadow", 3, reason="shadow 3")
    policy = RoutingPolicy(shadow_share=0.3)
    ids = [f"m{i}" for i in range(200)]
    with ModelService("mnist@production", registry=registry, routing=policy, canary=False) as svc:
        for rid in ids:
            svc.score(images(1), request_id=rid)
        deadline = time.monotonic() + 20
        want = sum(policy.mirror(rid) for rid in ids)
        while svc.shadow_served < want and time.monotonic() < deadline:
            time.sleep(0.02)
        assert svc.shadow_served == want and svc.shadow_dropped == 0
    assert abs(want - 60) <= 4 * math.sqrt(200 * 0.3 * 0.7)


def _wait_for(cond, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return cond()


def test_a_shadow_process_writes_the_same_records_and_follows_its_alias(registry, tmp_path):
    registry.set_alias("mnist", "shadow", 3, reason="shadow 3")
    uri = f"sqlite:///{tmp_path / 'records.db'}"
    x = images(2, seed=5)
    with ModelService("mnist@production", registry=registry, canary=False, store=uri, shadow_process=True,
                      poll_interval_s=0.2) as svc:
        proc = svc._shadow_proc
        assert proc is not None and proc.alive
        for i in range(10):
            assert svc.score(x, request_id=f"p{i}").version == "1"
        assert _wait_for(lambda: svc.store.count(route="shadow") == 20)  # the child wrote them itself
        if hasattr(os, "SCHED_IDLE"):  # it runs only on cores nothing else wants (Linux)
            assert os.sched_getscheduler(proc.process.pid) == os.SCHED_IDLE
        registry.set_alias("mnist", "shadow", 2, reason="shadow 2")
        assert _wait_for(lambda: svc.shadow is not None and svc.shadow.version == "2")
        time.sleep(0.5)  # the child was told to reload; it also polls its own source
        svc.score(x, request_id="after")
        assert _wait_for(lambda: len(svc.store.join("after").get("shadow", [])) == 2)
        info = svc.describe()["routing"]["shadow_process"]
        assert info["alive"] and info["sent"] >= 22 and info["errors"] == 0
    store = RecordStore(uri)
    joined = store.join("p4")
    assert [r["version"] for r in joined["shadow"]] == ["3", "3"]
    ins = load_model(registry.get("mnist/3").artifact_path).eval().inspect(torch.from_numpy(x))
    assert [r["recon_nats"] for r in joined["shadow"]] == pytest.approx(ins.recon_nats.tolist(), rel=1e-5)
    assert [r["pixel_var"] for r in joined["shadow"]] == [r["pixel_var"] for r in joined["production"]]
    assert [r["version"] for r in store.join("after")["shadow"]] == ["2", "2"]
    assert not proc.alive  # close() stopped it
    store.close()


def test_a_killed_shadow_process_leaves_production_serving(registry, tmp_path):
    registry.set_alias("mnist", "shadow", 3, reason="shadow 3")
    with ModelService("mnist@production", registry=registry, canary=False,
                      store=f"sqlite:///{tmp_path / 'records.db'}", shadow_process=True) as svc:
        proc = svc._shadow_proc
        proc.process.kill()
        proc.process.join(10)
        for i in range(30):
            assert svc.score(images(1, seed=i), request_id=f"k{i}").version == "1"
        assert _wait_for(lambda: proc.errors > 0, 10)  # counted, never raised into a request
        store = svc.store
    assert store.count(route="production") == 30 and store.count(route="shadow") == 0
    with pytest.raises(ConfigError, match="record-store URI"):
        ModelService("mnist@production", registry=registry, shadow_process=True)
