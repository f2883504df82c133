"""Serving registry references: ``name@alias`` follows the alias (polling and the admin alias move),
``name/3`` is pinned, the version label is the registry's number, and a registered version's
reference profile turns on the recon verdicts. SQLite and PostgreSQL (the ``db_uri`` fixture)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import wait_ready
from test_serving import images, save_model
from test_serving_load import free_port

from vaekit.errors import ConfigError
from vaekit.registry import ModelRegistry
from vaekit.serving import ModelService, create_app
from vaekit.serving.sources import RegistrySource, resolve_source

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def registry(db_uri, tmp_path):
    reg = ModelRegistry(db_uri, artifact_root=tmp_path / "artifacts", actor="tester@ci")
    for seed in (0, 1):
        folder = save_model(tmp_path / f"m{seed}", seed=seed)
        reg.register(folder, "mnist", alias="production" if seed == 0 else None, reason="test",
                     profile_images=torch.from_numpy(images(64, seed=9)))
    yield reg
    reg.close()


def test_alias_reference_serves_the_alias_and_reads_the_profile(registry):
    with ModelService("mnist@production", registry=registry) as svc:
        assert svc.name == "mnist" and svc.version == "1" and svc.source.follows
        s = svc.score(images(8)).stats
        p99 = svc.deployment.thresholds["recon_nats_p99"]
        prof = svc.deployment.profile
        assert p99 == pytest.approx(prof.quantiles["recon_nll"]["p99"])
        assert torch.equal(s.recon_above_p99, s.recon_nats > p99)
        assert svc.describe()["profile"]["available"] is True
    pinned = resolve_source("mnist/2", registry=registry)
    assert isinstance(pinned, RegistrySource) and not pinned.follows and pinned.current_version() == "2"


def test_an_alias_move_is_picked_up_by_polling(registry):
    with ModelService("mnist@production", registry=registry, poll_interval_s=0.05) as svc:
        assert svc.score(images(1)).version == "1"
        registry.set_alias("mnist", "production", 2, reason="promote")
        deadline = time.monotonic() + 20
        while svc.version == "1" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert svc.score(images(1)).version == "2" and svc.swaps == 1


def test_admin_alias_move_goes_through_the_registry_and_swaps(registry):
    svc = ModelService("mnist@production", registry=registry)
    with TestClient(create_app(svc, admin_token="tok")) as c:
        auth = {"authorization": "Bearer tok"}
        assert c.post("/admin/models/mnist/alias", json={"alias": "production", "version": 2}).status_code == 401
        r = c.post("/admin/models/mnist/alias", headers=auth,
                   json={"alias": "production", "version": 2, "reason": "canary was good"})
        assert r.status_code == 200 and r.json() == {"previous": "1", "current": "2", "changed": True}
        assert c.post("/v1/models/mnist/score", json={"x": images(1).tolist()}).headers["x-model-version"] == "2"
        assert c.get("/v2/models/mnist/versions/2/ready").status_code == 200
        assert c.get("/v2/models/mnist/versions/1/ready").status_code == 404
        hist = registry.history("mnist", "production")
        assert hist[-1].reason == "canary was good" or hist[0].reason == "canary was good"
        r = c.post("/admin/models/mnist/alias", headers=auth, json={"alias": "production", "version": 99})
        assert r.status_code in (404, 409, 422) and r.headers["content-type"] == "application/problem+json"


def test_unknown_references_are_clear_errors(registry, tmp_path, monkeypatch):
    with pytest.raises(Exception, match="nope"):
        ModelService("nope@production", registry=registry)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VAEKIT_REGISTRY", raising=False)
    with pytest.raises(ConfigError, match="no registry"):
        resolve_source("mnist@production")
    assert not (tmp_path / "registry").exists()  # looking did not create a registry


def test_vaekit_serve_follows_a_registry_alias(registry, db_uri, tmp_path):
    if not db_uri.startswith("sqlite"):
        pytest.skip("the CLI path is the same for both backends")
    port = free_port()
    # no VAEKIT_REGISTRY_ARTIFACTS: the registry recorded its artifact root when the fixture created it
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("VAEKIT_REGISTRY_ARTIFACTS", None)
    proc = subprocess.Popen([sys.executable, "-m", "vaekit.cli.main", "serve", "mnist@production", "--registry",
                             db_uri, "--port", str(port), "--poll-interval", "0.2", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(proc, port)
        body = {"x": images(1).tolist()}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/models/mnist/score", json=body).json()["version"] == "1"
        registry.set_alias("mnist", "production", 2, reason="promote")
        deadline = time.monotonic() + 20
        version = "1"
        while version == "1" and time.monotonic() < deadline:
            version = httpx.post(f"http://127.0.0.1:{port}/v1/models/mnist/score", json=body).json()["version"]
            time.sleep(0.05)
        assert version == "2"
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
