"""What the record store costs production latency, by write interval (issue 11).

    python bench/serve_records.py                      # 4 servers x 3 levels x 4 rounds of 4 s, ~5 minutes
    python bench/serve_records.py --intervals 0.01,0.05 --concurrency 1 --rounds 2   # a quick look

The MLP 784-400-20 VAE served by the vaekit app (micro-batching on, as ``bench/serve.py``), once
with no record store and once per ``--intervals`` value with a SQLite store whose dispatcher writes
every that many seconds (``ModelService(record_interval_s=)``). Every server runs in its own
process; the load generator of ``bench/serve.py`` drives them in rotating cells (each server first
in turn, so a change in the machine's load hits all), batch-1 ``POST /score`` over loopback.
Reports, per server and concurrency, the medians over rounds of p50, p99 and throughput. Writes
bench/results/serve_records.json; prints a table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import MODELS, ROOT, free_port, load_cell, wait_ready  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "serve_records.json"
SERVE = str(ROOT / "bench" / "serve.py")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--intervals", default="0.05,0.02,0.01", help="store write intervals to compare, seconds")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=float, default=4.0, help="seconds measured per cell")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    import torch

    from vaekit.models import VAEConfig, build_model

    intervals = [float(v) for v in args.intervals.split(",")]
    if not intervals or any(v <= 0 for v in intervals):
        ap.error(f"--intervals must be positive seconds, got {args.intervals!r}")
    levels = [int(c) for c in args.concurrency.split(",")]
    servers = {"no store": ("vaekit", None), **{f"store, {v * 1000:g} ms": ("vaekit-store", v) for v in intervals}}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    doc = {"command": "python bench/serve_records.py " + " ".join(argv or sys.argv[1:]),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                       "loadavg_before": os.getloadavg()},
           "settings": {"model": "mlp 784-400-20", "rounds": args.rounds, "duration_s": args.duration,
                        "store": "SQLite (WAL)", "torch_threads": 1},
           "cells": [], "summary": {}}
    with tempfile.TemporaryDirectory() as tmp:
        mdir = Path(tmp) / "mlp"
        torch.manual_seed(0)
        build_model(VAEConfig(**MODELS["mlp"])).save(mdir)
        body = Path(tmp) / "x.npy"
        buf = io.BytesIO()
        np.save(buf, np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32))
        body.write_bytes(buf.getvalue())
        procs, ports = {}, {}
        try:
            for i, (name, (kind, interval)) in enumerate(servers.items()):
                ports[name] = free_port()
                senv = {**env, **({"VAEKIT_BENCH_RECORD_INTERVAL": str(interval)} if interval else {})}
                # each store server gets its own model folder, so its SQLite file is its own
                model_dir = Path(tmp) / f"mlp{i}"
                if not model_dir.exists():
                    model_dir.symlink_to(mdir)
                procs[name] = subprocess.Popen([sys.executable, SERVE, "--server", kind, "--model-dir",
                                                str(model_dir), "--port", str(ports[name])], env=senv)
                wait_ready(ports[name], procs[name])
            names = list(servers)
            for c in levels:
                for r in range(args.rounds):
                    k = r % len(names)
                    for name in names[k:] + names[:k]:
                        cell = {"server": name, "round": r,
                                **load_cell(ports[name], body, c, args.duration, args.warmup, env)}
                        doc["cells"].append(cell)
                        print(f"c={c:<3d} round {r} {name:16s} p50={cell['p50_ms']:.3f} p99={cell['p99_ms']:.3f} "
                              f"req/s={cell['throughput_rps']}", flush=True)
        finally:
            for p in procs.values():
                p.terminate()
                p.wait(10)
    doc["machine"]["loadavg_after"] = os.getloadavg()
    print(f"\n{'server':16s} {'conc':>4s} {'p50 ms':>8s} {'p99 ms':>8s} {'req/s':>8s}   (medians over rounds)")
    for name in servers:
        for c in levels:
            cells = [x for x in doc["cells"] if x["server"] == name and x["concurrency"] == c]
            med = {q: statistics.median(x[q] for x in cells) for q in ("p50_ms", "p99_ms", "throughput_rps")}
            doc["summary"].setdefault(name, {})[str(c)] = med
            print(f"{name:16s} {c:4d} {med['p50_ms']:8.3f} {med['p99_ms']:8.3f} {med['throughput_rps']:8.0f}")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
