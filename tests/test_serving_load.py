"""Load with a model swap in the middle, against a real `vaekit serve` process over loopback:
clients send mixed requests (score, encode, reconstruct, decode, generate, OIP infer) while the
served folder is replaced by a new model. Zero 5xx, zero failed requests, every response names
its version, and the swap shows in the responses (old version first, then only the new one).
The default run is 8 clients for a few seconds; ``-m slow`` runs 32 clients for 60 s."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import wait_ready
from test_serving import images, npy, save_model

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "load-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "VAEKIT_ADMIN_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vaekit.cli.main", "serve", str(model), "--port", str(port),
                             "--threads", "1", "--log-level", "warning", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_ready(proc, port)
    return proc


def requests_mix(i: int):
    x1, x2 = images(1, seed=i), images(2, seed=i)
    kinds = [
        ("POST", "/v1/models/m/score", {"content": npy(x1), "headers": {"content-type": "application/x-npy"}}),
        ("POST", "/v1/models/m/encode", {"json": {"x": x2.tolist()}}),
        ("POST", "/v1/models/m/reconstruct", {"json": {"x": {"data": x1.ravel().tolist(), "shape": [1, 1, 28, 28]}}}),
        ("POST", "/v1/models/m/decode", {"json": {"z": np.zeros((1, 4)).tolist()}}),
        ("POST", "/v1/models/m/generate", {"json": {"n": 2, "seed": i}}),
        ("POST", "/v2/models/m/infer", {"json": {"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                                             "data": x1.ravel().tolist()}]}}),
        ("POST", "/v1/models/m/score", {"json": {"x": [[1, 2]]}}),  # a bad request: 422, never 5xx
    ]
    return kinds[i % len(kinds)]


async def client_loop(c: httpx.AsyncClient, k: int, stop_at: float, log: list, failures: list) -> None:
    i = k
    while time.monotonic() < stop_at:
        method, path, kw = requests_mix(i)
        i += 1
        t0 = time.monotonic()
        try:
            r = await c.request(method, path, **kw)
        except httpx.HTTPError as exc:
            failures.append(f"{path}: {type(exc).__name__}: {exc}")
            continue
        log.append((t0, time.monotonic(), path, r.status_code, r.headers.get("x-model-version")))


async def drive(port: int, clients: int, seconds: float, swap) -> tuple[list, list]:
    log, failures = [], []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30, limits=limits) as c:
        stop_at = time.monotonic() + seconds
        tasks = [asyncio.create_task(client_loop(c, k, stop_at, log, failures)) for k in range(clients)]
        await asyncio.sleep(seconds / 2)
        await swap(c)
        await asyncio.gather(*tasks)
    return log, failures


def run_load_with_swap(tmp_path: Path, clients: int, seconds: float, via: str) -> None:
    model = save_model(tmp_path / "m", seed=0)
    port = free_port()
    proc = start_server(model, port, "--poll-interval", "0.5", "--max-batch-size", "16", "--max-wait-ms", "2")
    swap_at = []
    try:
        v1 = httpx.get(f"http://127.0.0.1:{port}/readyz").json()["models"]["m"]

        async def swap(c: httpx.AsyncClient) -> None:
            await asyncio.to_thread(save_model, model, None, 1)  # the "alias move": a new model in the folder
            if via == "admin":
                r = await c.post("/admin/models/m/reload", headers={"authorization": f"Bearer {TOKEN}"})
                # the poller may have swapped first; either way the new version serves when this returns
                assert r.status_code == 200 and r.json()["current"] != v1, r.text
            swap_at.append(time.monotonic())

        log, failures = asyncio.run(drive(port, clients, seconds, swap))
        v2 = httpx.get(f"http://127.0.0.1:{port}/readyz").json()["models"]["m"]
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert not failures, failures[:5]
    statuses = {s for *_, s, _ in log}
    assert all(s < 500 for s in statuses), sorted(statuses)
    assert {s for _, _, p, s, _ in log if "score" not in p} == {200}
    assert all(v in (v1, v2) for *_, v in log), "a response without a known version"
    assert v1 != v2, "the swap did not happen"
    versions_in_order = [v for _, _, _, s, v in sorted(log) if s == 200]
    first_new = versions_in_order.index(v2)
    assert set(versions_in_order[:first_new]) == {v1} and first_new > 0
    # atomic: once a response came from v2, every request sent later is served by v2 (no flapping);
    # and once the admin reload returned, too
    first_v2_done = min(t1 for _, t1, _, _, v in log if v == v2)
    settled = min(first_v2_done, swap_at[0]) if via == "admin" else first_v2_done
    assert {v for t0, _, _, s, v in log if t0 > settled} == {v2}
    assert "vaekit_model_swaps_total" in metrics and 'status="500"' not in metrics
    assert "Traceback" not in out, out[-2000:]
    print(f"{len(log)} requests in {seconds} s, {clients} clients, swap {v1} -> {v2} via {via}")


@pytest.mark.parametrize("via", ["admin", "poll"])
def test_short_load_with_a_swap(tmp_path, via):
    run_load_with_swap(tmp_path, clients=8, seconds=3.0, via=via)


@pytest.mark.slow
def test_load_32_clients_60_seconds_with_a_swap(tmp_path):
    run_load_with_swap(tmp_path, clients=32, seconds=60.0, via="poll")


def test_serve_cli_refuses_a_bad_reference(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-m", "vaekit.cli.main", "serve", str(tmp_path / "missing")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "model reference must be a model folder" in r.stderr


def test_python_client_against_a_real_server(tmp_path):
    from vaekit.serving import Client, ClientError

    model = save_model(tmp_path / "m")
    port = free_port()
    proc = start_server(model, port)
    try:
        with Client(f"http://127.0.0.1:{port}") as c:
            assert c.healthz() and c.readyz() and c.models()[0]["name"] == "m"
            x = images(2)
            a, b = c.score("m", x), c.score("m", x, fmt="json")
            assert a["version"] == b["version"] and len(a["results"]) == 2
            assert [r["recon_nats"] for r in a["results"]] == pytest.approx([r["recon_nats"] for r in b["results"]])
            assert len(c.encode("m", x)["results"][0]["mean"]) == 4
            assert c.reconstruct("m", x, png=True)[:8] == b"\x89PNG\r\n\x1a\n"
            assert np.asarray(c.decode("m", np.zeros((1, 4), np.float32))["images"]).shape == (1, 1, 28, 28)
            assert c.generate("m", 2, seed=3)["images"] == c.generate("m", 2, seed=3)["images"]
            out = c.infer("m", [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                 "data": x[0].ravel().tolist()}], outputs=["recon_nats"], id="7")
            assert out["id"] == "7" and out["outputs"][0]["name"] == "recon_nats"
            assert c.reload("m", TOKEN)["changed"] is False
            with pytest.raises(ClientError) as err:
                c.score("m", x * 255)
            assert err.value.status == 422 and "[0, 1]" in err.value.problem["detail"]
            with pytest.raises(ClientError) as err:
                c.reload("m", "wrong")
            assert err.value.status == 403
            assert "vaekit_requests_total" in c.metrics()
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
