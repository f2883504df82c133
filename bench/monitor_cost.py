"""What one ``vaekit monitor run`` iteration costs, on SQLite and on PostgreSQL (issue 12).

    python bench/monitor_cost.py                 # SQLite, and PostgreSQL where a server answers
    python bench/monitor_cost.py --requests 2000 --iterations 9

A VAE (MLP 784-400-16) trained for one epoch on 10,000 MNIST training images is registered with a
profile on 2,000 MNIST test images (the default sample: every detector fits on all of it), and
``--requests`` records of further MNIST test images (their figures from ``model.inspect``, as the
service writes them) are put in a fresh record store within the monitor's 5-minute window. Then
``Monitor.run_once`` runs ``--iterations`` times on one thread: the first iteration reads the
profile and fits the 11 default detectors; the later ones reuse them, as ``vaekit monitor run``
does. Reported per backend: the first iteration, the median of the later ones, and the median of
reading the window alone (``RecordStore.window``). PostgreSQL: ``$VAEKIT_TEST_POSTGRES`` or
``postgresql://postgres@127.0.0.1:5432/test``, in a schema of its own, dropped afterwards.
Writes bench/results/monitor_cost.json; prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from vaekit import VAEConfig, load_dataset  # noqa: E402
from vaekit.data import ImageDataset  # noqa: E402
from vaekit.models import VAE  # noqa: E402
from vaekit.monitoring.monitor import Monitor  # noqa: E402
from vaekit.monitoring.store import RecordStore  # noqa: E402
from vaekit.registry import ModelRegistry  # noqa: E402
from vaekit.training import TrainConfig, Trainer  # noqa: E402

PG_URI = os.environ.get("VAEKIT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
T0 = 1_800_000_000.0


def records(model: Any, x: torch.Tensor, t0: float, t1: float) -> list[dict[str, Any]]:
    """One record per image, the service's figures, spread over [t0, t1)."""
    with torch.no_grad():
        ins = model.inspect(x)
    flat = x.flatten(1).double()
    n = x.shape[0]
    return [{"time": t0 + (t1 - t0) * i / n, "request_id": f"r{i}", "model": "mnist", "version": "1",
             "route": "production", "endpoint": "score", "latency_s": 0.002, "recon_mse": float(ins.recon_mse[i]),
             "recon_nats": float(ins.recon_nats[i]), "kl": float(ins.kl[i]), "latent_norm": float(ins.latent_norm[i]),
             "latent": ins.latent[i].tolist(), "pixel_mean": float(flat[i].mean()),
             "pixel_var": float(flat[i].var(unbiased=False)), "accepted": True} for i in range(n)]


def measure(uri: str, model_dir: Path, profile_x: torch.Tensor, window_x: torch.Tensor, iterations: int,
            artifacts: Path) -> dict[str, Any]:
    reg = ModelRegistry(uri, artifact_root=artifacts, actor="bench")
    store = RecordStore(uri)
    try:
        reg.register(model_dir, "mnist", alias="production", reason="bench", profile_images=profile_x)
        model = reg.load("mnist/1").eval()
        now = T0 + 300.0
        store.append(records(model, window_x, T0 + 1.0, now - 1.0))
        mon = Monitor(store, reg, "mnist")
        times, reads = [], []
        for _ in range(iterations):
            t = time.perf_counter()
            it = mon.run_once(now=now)
            times.append(time.perf_counter() - t)
            t = time.perf_counter()
            store.window("mnist", version="1", route="production", start=now - 300.0, end=now)
            reads.append(time.perf_counter() - t)
        scored = [g for g in it.groups if g.results]
        n = scored[0].n if scored else 0
        return {"first_ms": 1000 * times[0], "later_ms": 1000 * statistics.median(times[1:]),
                "window_read_ms": 1000 * statistics.median(reads), "records_scored": n,
                "detectors": len(scored[0].results) if scored else 0, "iterations": iterations}
    finally:
        store.close()
        reg.close()


def postgres_schema() -> tuple[str, Any] | None:
    """A fresh schema on the PostgreSQL server (URI, cleanup), or None when no server answers."""
    from sqlalchemy import text

    from vaekit.db import make_engine

    admin = make_engine(PG_URI)
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure to connect means: no server here
        print(f"PostgreSQL skipped: {PG_URI}: {type(exc).__name__}: {exc}".splitlines()[0])
        admin.dispose()
        return None
    schema = f"vaekit_bench_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))

    def drop() -> None:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()

    return f"{PG_URI}{'&' if '?' in PG_URI else '?'}options=-csearch_path%3D{schema}", drop


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=500, help="records in the monitor's window")
    ap.add_argument("--iterations", type=int, default=6, help="run_once calls per backend (the first fits)")
    ap.add_argument("--out", default="monitor_cost")
    args = ap.parse_args(argv)
    if args.iterations < 2 or not 1 <= args.requests <= 8000:
        ap.error("--iterations must be >= 2 and --requests in [1, 8000]")
    torch.set_num_threads(1)
    mnist = load_dataset("mnist")
    profile_x = mnist.test.images[:2000].float() / 255
    window_x = mnist.test.images[2000:2000 + args.requests].float() / 255
    results: dict[str, Any] = {"requests": args.requests, "torch_threads": 1, "backends": {}}
    with tempfile.TemporaryDirectory() as tmp:
        ds = ImageDataset("mnist", mnist.train.subset(10_000), mnist.test.subset(500), mnist.classes,
                          mnist.provenance)
        torch.manual_seed(0)
        cfg = TrainConfig(epochs=1, batch_size=128, checkpoint_every=0, progress=False, tensorboard="off", seed=0,
                          eval_batch_size=500)
        model_dir = Trainer(VAE(VAEConfig(latent_dim=16, hidden_sizes=(400,))), ds, cfg,
                            run_dir=Path(tmp) / "run").fit().model_dir
        backends = {"sqlite": (f"sqlite:///{Path(tmp) / 'db' / 'monitor.db'}", None)}
        pg = postgres_schema()
        if pg is not None:
            backends["postgresql"] = pg
        for name, (uri, cleanup) in backends.items():
            try:
                results["backends"][name] = measure(uri, model_dir, profile_x, window_x, args.iterations,
                                                    Path(tmp) / f"artifacts-{name}")
            finally:
                if cleanup is not None:
                    cleanup()
    print_table(["backend", "first iteration ms", "later iterations ms (median)", "window read ms", "records",
                 "detectors"],
                [[k, v["first_ms"], v["later_ms"], v["window_read_ms"], v["records_scored"], v["detectors"]]
                 for k, v in results["backends"].items()])
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
