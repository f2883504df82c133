"""Serving benchmark: batch-1 POST /score over loopback HTTP, against a bare FastAPI handler and the
model's own forward time (the floor).

    python bench/serve.py                       # MLP 784-400-20 VAE and the conv VAE, ~2.5 minutes
    python bench/serve.py --duration 2 --models mlp --concurrency 1,8   # a quick look
    python bench/serve.py --shadow             # production p99 with a shadow on vs off, same run

For each model it starts, one after another, three servers in their own processes (uvicorn, one
worker, torch on 1 thread): the vaekit app with micro-batching (max_batch_size 16, max_wait_ms 2),
the vaekit app with batching off (max_batch_size 1), and a bare FastAPI handler that calls
``model.encode`` (no stats, no validation, no batching). A load generator in another process
keeps C keep-alive connections busy (each sends a request, waits for the answer, sends the next)
for ``--duration`` seconds per cell and records every request's latency. Bodies are one image
as ``.npy`` bytes (the same bytes for every server). The floor is ``model.inspect`` (what /score
runs) and ``model.encode`` at batch 1 in this process, 1 thread. Weights are random (latency does
not depend on them). Writes bench/results/serve.json; prints a table.

``--shadow``: the MLP model served by the vaekit app, every server writing its records to a SQLite
store: with no shadow (``vaekit-store``), with a shadow on the service's background thread
(``vaekit-shadow``: a second MLP of the same size gets a copy of every request, ``shadow_share`` 1)
and with the shadow in its own process (``vaekit-shadowproc``, ``shadow_process=True``), and with
no store at all (``vaekit``: the store's own cost, reported under ``vaekit-store``); the
servers measured in rotating cells (``--rounds`` each, so a change in the machine's load hits all)
at each concurrency; the added p99 is the median over rounds of (p99 with the shadow - p99
without). Writes bench/results/serve_shadow.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request  # module level: FastAPI resolves the handler's annotations here
from fastapi.responses import Response

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "serve.json"
SHADOW_RESULTS = ROOT / "bench" / "results" / "serve_shadow.json"
MODELS = {
    "mlp": {"latent_dim": 20, "hidden_sizes": [400]},  # 784-400-20
    "conv": {"latent_dim": 20, "architecture": "conv", "conv_channels": [32, 64], "hidden_sizes": [256]},
}
SERVERS = ("vaekit", "vaekit-nobatch", "bare")
SHADOW_SERVERS = ("vaekit-store", "vaekit-shadow", "vaekit-shadowproc")  # --shadow: the baseline first
ROTATION = (*SHADOW_SERVERS, "vaekit")  # --shadow also measures the store's own cost: vaekit-store - vaekit


# -- the servers (run in child processes) ----------------------------------------------------------------
def bare_app(model_dir: str):
    """A FastAPI handler with nothing but the model: parse .npy, encode, answer the posterior mean."""
    import torch

    from vaekit import load_model

    model = load_model(model_dir)
    app = FastAPI()

    @app.post("/v1/models/{name}/score")
    async def score(name: str, request: Request) -> Response:
        x = torch.from_numpy(np.load(io.BytesIO(await request.body()), allow_pickle=False))
        with torch.inference_mode():
            mean = model.encode(x).mean
        return Response(json.dumps({"latent": mean.tolist()}), media_type="application/json")

    @app.get("/readyz")
    async def ready() -> dict:
        return {"ready": True}

    return app


def record_interval() -> dict:
    """``record_interval_s`` from $VAEKIT_BENCH_RECORD_INTERVAL (bench/serve_records.py sets it), else the
    service's own default."""
    value = os.environ.get("VAEKIT_BENCH_RECORD_INTERVAL")
    return {"record_interval_s": float(value)} if value else {}


def run_server(kind: str, model_dir: str, port: int) -> None:
    import torch
    import uvicorn

    torch.set_num_threads(1)
    if kind == "bare":
        app = bare_app(model_dir)
    else:
        from vaekit.serving import FolderSource, ModelService, create_app

        shadowed = kind in ("vaekit-shadow", "vaekit-shadowproc")
        shadow = FolderSource(model_dir + "-shadow", name="m") if shadowed else False
        # the --shadow servers all write their records to a SQLite store, as a deployment with a shadow does
        store = f"sqlite:///{model_dir}-{kind}.db" if kind in SHADOW_SERVERS else None
        svc = ModelService(model_dir, name="m", device="cpu", threads=1,
                           max_batch_size=1 if kind == "vaekit-nobatch" else 16, max_wait_ms=2.0, shadow=shadow,
                           store=store, shadow_process=kind == "vaekit-shadowproc", **record_interval())
        svc.start()
        app = create_app(svc, freeze_gc=os.environ.get("VAEKIT_BENCH_FREEZE_GC", "1") == "1")
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- the load generator (a child process) -------------------------------------------------------------------
async def _worker(port: int, request: bytes, stop_at: float, lat: list[float], bad: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            if status != 200:
                bad.append(status)
    finally:
        writer.close()


async def _load(port: int, request: bytes, concurrency: int, duration: float, warmup: float) -> dict:
    lat: list[float] = []
    bad: list[int] = []
    t0 = time.perf_counter()
    await asyncio.gather(*[_worker(port, request, t0 + warmup, [], []) for _ in range(concurrency)])
    t1 = time.perf_counter()
    await asyncio.gather(*[_worker(port, request, t1 + duration, lat, bad) for _ in range(concurrency)])
    elapsed = time.perf_counter() - t1
    lat.sort()
    ms = [v * 1e3 for v in lat]
    return {"concurrency": concurrency, "requests": len(lat), "seconds": round(elapsed, 3),
            "throughput_rps": round(len(lat) / elapsed, 1), "errors": len(bad),
            "p50_ms": round(statistics.median(ms), 3), "p90_ms": round(ms[int(0.90 * (len(ms) - 1))], 3),
            "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 3), "mean_ms": round(statistics.fmean(ms), 3)}


def run_load(port: int, body_file: str, concurrency: int, duration: float, warmup: float) -> None:
    body = Path(body_file).read_bytes()
    request = (f"POST /v1/models/m/score HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/x-npy\r\n"
               f"content-length: {len(body)}\r\n\r\n").encode() + body
    print(json.dumps(asyncio.run(_load(port, request, concurrency, duration, warmup))))


# -- the driver ---------------------------------------------------------------------------------------------
def load_cell(port: int, body: Path, concurrency: int, duration: float, warmup: float, env: dict) -> dict:
    """One measured cell: the load generator in its own process against 127.0.0.1:port; its JSON figures."""
    out = subprocess.run([sys.executable, __file__, "--load", "--port", str(port), "--body", str(body),
                          "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", str(warmup)],
                         env=env, capture_output=True, text=True, timeout=duration + warmup + 60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import httpx

    from vaekit.serving import Client

    deadline = time.monotonic() + timeout
    with Client(f"http://127.0.0.1:{port}", timeout=1) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if client.readyz():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    raise RuntimeError("server did not become ready")


def floor(model_dir: str, runs: int = 2000) -> dict:
    """Batch-1 forward time in this process, 1 thread: inspect (what /score runs) and encode."""
    import torch

    from vaekit import load_model

    torch.set_num_threads(1)
    model = load_model(model_dir)
    x = torch.rand(1, *model.input_shape)
    out = {}
    with torch.inference_mode():
        for name, fn in (("inspect", lambda: model.inspect(x)), ("encode", lambda: model.encode(x).mean)):
            for _ in range(100):
                fn()
            ts = []
            for _ in range(runs):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            ts.sort()
            out[name] = {"p50_ms": round(ts[len(ts) // 2], 4), "p99_ms": round(ts[int(0.99 * (len(ts) - 1))], 4)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mlp,conv")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds measured per cell")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load before each cell")
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--no-freeze-gc", action="store_true",
                    help="serve with create_app(freeze_gc=False): what the frozen heap saves")
    ap.add_argument("--out", help="results file (default bench/results/serve.json, or serve_shadow.json)")
    ap.add_argument("--shadow", action="store_true", help="measure the shadow's cost on production latency")
    ap.add_argument("--rounds", type=int, default=4, help="--shadow: alternating cells per server")
    ap.add_argument("--server", help=argparse.SUPPRESS)
    ap.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--body", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.server:
        run_server(args.server, args.model_dir, args.port)
        return 0
    if args.load:
        run_load(args.port, args.body, int(args.concurrency), args.duration, args.warmup)
        return 0

    import torch

    from vaekit.models import VAEConfig, build_model

    if args.shadow:
        return shadow_main(args)
    args.out = args.out or str(RESULTS)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "VAEKIT_BENCH_FREEZE_GC": "0" if args.no_freeze_gc else "1",
           "OMP_NUM_THREADS": "1"}
    levels = [int(c) for c in args.concurrency.split(",")]
    doc = {"command": "python " + " ".join(sys.argv), "machine": {
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "loadavg_before": os.getloadavg()},
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "body": "one image, .npy float32",
                     "torch_threads": 1, "batching": {"max_batch_size": 16, "max_wait_ms": 2.0}},
        "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for mname in args.models.split(","):
            torch.manual_seed(0)
            model = build_model(VAEConfig(**MODELS[mname]))
            mdir = Path(tmp) / mname
            model.save(mdir)
            body = Path(tmp) / f"{mname}.npy"
            buf = io.BytesIO()
            np.save(buf, np.random.default_rng(0).random((1, *model.input_shape), dtype=np.float32))
            body.write_bytes(buf.getvalue())
            entry = {"config": MODELS[mname], "floor_ms": floor(str(mdir)), "servers": {}}
            for kind in args.servers.split(","):
                port = free_port()
                proc = subprocess.Popen([sys.executable, __file__, "--server", kind, "--model-dir", str(mdir),
                                         "--port", str(port)], env=env)
                try:
                    wait_ready(port, proc)
                    cells = []
                    for c in levels:
                        cells.append(load_cell(port, body, c, args.duration, args.warmup, env))
                        print(f"{mname:5s} {kind:15s} c={c:<3d} " + " ".join(f"{k}={v}" for k, v in cells[-1].items()
                                                                            if k != "concurrency"), flush=True)
                    entry["servers"][kind] = cells
                finally:
                    proc.terminate()
                    proc.wait(10)
            doc["models"][mname] = entry
    doc["machine"]["loadavg_after"] = os.getloadavg()
    summarize(doc)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def shadow_main(args: argparse.Namespace) -> int:
    """Production latency with and without a shadow, alternating servers cell by cell."""
    import torch

    from vaekit.models import VAEConfig, build_model

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "VAEKIT_BENCH_FREEZE_GC": "0" if args.no_freeze_gc else "1",
           "OMP_NUM_THREADS": "1"}
    levels = [int(c) for c in args.concurrency.split(",")]
    doc: dict = {"command": "python " + " ".join(sys.argv), "machine": {
        "cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
        "loadavg_before": os.getloadavg()},
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "rounds": args.rounds, "model": "mlp",
                     "shadow": "a second MLP 784-400-20, every request mirrored", "torch_threads": 1},
        "cells": [], "added_p99_ms": {}, "added_p50_ms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        mdir = Path(tmp) / "mlp"
        for seed, path in ((0, mdir), (1, Path(str(mdir) + "-shadow"))):
            torch.manual_seed(seed)
            build_model(VAEConfig(**MODELS["mlp"])).save(path)
        body = Path(tmp) / "x.npy"
        buf = io.BytesIO()
        np.save(buf, np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32))
        body.write_bytes(buf.getvalue())
        procs, ports = {}, {}
        try:
            for kind in ROTATION:
                ports[kind] = free_port()
                procs[kind] = subprocess.Popen([sys.executable, __file__, "--server", kind, "--model-dir", str(mdir),
                                                "--port", str(ports[kind])], env=env)
                wait_ready(ports[kind], procs[kind])
            for c in levels:
                for r in range(args.rounds):
                    k = r % len(ROTATION)
                    order = ROTATION[k:] + ROTATION[:k]  # each server first in turn
                    for kind in order:
                        cell = {"server": kind, "round": r,
                                **load_cell(ports[kind], body, c, args.duration, args.warmup, env)}
                        doc["cells"].append(cell)
                        print(f"c={c:<3d} round {r} {kind:17s} p50={cell['p50_ms']:.3f} p99={cell['p99_ms']:.3f} "
                              f"req/s={cell['throughput_rps']} errors={cell['errors']}", flush=True)
        finally:
            for p in procs.values():
                p.terminate()
                p.wait(10)
    # the shadows against the store alone; the store ("vaekit-store" key) against no store at all
    for kind, base in (*((k, "vaekit-store") for k in SHADOW_SERVERS[1:]), ("vaekit-store", "vaekit")):
        for q in ("p99", "p50"):
            per_c = doc[f"added_{q}_ms"].setdefault(kind, {})
            for c in levels:
                diffs = []
                for r in range(args.rounds):
                    on, off = ([x for x in doc["cells"] if x["concurrency"] == c and x["round"] == r
                                and x["server"] == k][0] for k in (kind, base))
                    diffs.append(round(on[f"{q}_ms"] - off[f"{q}_ms"], 3))
                per_c[str(c)] = {"per_round": diffs, "median": statistics.median(diffs)}
    doc["machine"]["loadavg_after"] = os.getloadavg()
    for kind in (*SHADOW_SERVERS[1:], "vaekit-store"):
        print(f"\nadded by {kind} (ms, median over rounds; the store against none, a shadow against the store):",
              json.dumps({c: v["median"] for c, v in doc["added_p99_ms"][kind].items()}), "p99;",
              json.dumps({c: v["median"] for c, v in doc["added_p50_ms"][kind].items()}), "p50")
    out_path = Path(args.out or SHADOW_RESULTS)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


def _cell(doc_model: dict, server: str, c: int) -> dict | None:
    for cell in doc_model["servers"].get(server, []):
        if cell["concurrency"] == c:
            return cell
    return None


def summarize(doc: dict) -> None:
    """The table, and the issue's targets checked on the figures of this run."""
    print(f"\n{'model':5s} {'server':15s} {'conc':>4s} {'p50 ms':>8s} {'p99 ms':>8s} {'req/s':>8s} {'errors':>6s}")
    for mname, m in doc["models"].items():
        for kind, cells in m["servers"].items():
            for cell in cells:
                print(f"{mname:5s} {kind:15s} {cell['concurrency']:4d} {cell['p50_ms']:8.3f} {cell['p99_ms']:8.3f} "
                      f"{cell['throughput_rps']:8.1f} {cell['errors']:6d}")
        f = m["floor_ms"]
        print(f"{mname:5s} {'floor (model)':15s} {'':>4s} inspect p50 {f['inspect']['p50_ms']:.3f} ms, "
              f"encode p50 {f['encode']['p50_ms']:.3f} ms")
    checks = {}
    for mname, m in doc["models"].items():
        v1, b1 = _cell(m, "vaekit", 1), _cell(m, "bare", 1)
        v32, n32 = _cell(m, "vaekit", 32), _cell(m, "vaekit-nobatch", 32)
        c = {}
        if v1:
            c["p99_c1_ms"] = v1["p99_ms"]
        if v1 and b1:
            c["overhead_vs_bare_c1_p50"] = round(v1["p50_ms"] / b1["p50_ms"], 3)
            c["overhead_vs_bare_c1_p99"] = round(v1["p99_ms"] / b1["p99_ms"], 3)
        if v32:
            c["throughput_c32_rps"] = v32["throughput_rps"]
        if v32 and n32:
            c["batching_speedup_c32"] = round(v32["throughput_rps"] / n32["throughput_rps"], 3)
        checks[mname] = c
    doc["summary"] = checks
    print("\nsummary:", json.dumps(checks))


if __name__ == "__main__":
    sys.exit(main())
