"""``vaekit serve MODEL_OR_REF``: the HTTP inference service (FastAPI on uvicorn).

``MODEL_OR_REF`` is a model folder, a run folder (its ``model/``), or a registry reference
(``name@alias``, ``name/3``, ``name``) in ``--registry URI`` (default ``$VAEKIT_REGISTRY``); an alias
is polled every 10 s unless ``--poll-interval`` says otherwise. With ``--workers N`` > 1 uvicorn
starts N processes, each loading the model (settings travel in ``VAEKIT_SERVE_CONFIG``).
Admin routes are mounted only when ``VAEKIT_ADMIN_TOKEN`` is set. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from vaekit.errors import ConfigError, check_positive, check_share


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (encode/decode/reconstruct/generate/score)")
    p.add_argument("model", metavar="MODEL_OR_REF", help="model folder, run folder, or registry reference")
    p.add_argument("--registry", help="registry URI for a registry reference (default: $VAEKIT_REGISTRY, else "
                   "sqlite:///registry/registry.db)")
    p.add_argument("--name", help="model name in URLs (default: the folder or registry name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="server processes (each loads the model)")
    p.add_argument("--max-batch-size", type=int, default=16, help="images per model call; 1 turns batching off")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a batch may wait for more requests")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, help="torch CPU threads for the model (default: torch's choice)")
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="larger request bodies get 413")
    p.add_argument("--max-images", type=int, default=256, help="images per request")
    p.add_argument("--latent-norm-limit", type=float, default=5.0, help="flag images whose latent norm exceeds it")
    p.add_argument("--poll-interval", type=float, help="seconds between checks for a new version (default: off; "
                   "10 for a registry alias)")
    p.add_argument("--records", help="append a JSON line per served image to this file")
    p.add_argument("--store", nargs="?", const="sqlite:///monitoring/records.db", default=None, metavar="URI",
                   help="write every request record to the monitoring store at URI (sqlite:///PATH or "
                   "postgresql://...; without a value: sqlite:///monitoring/records.db, beside the default registry)")
    p.add_argument("--no-gate", action="store_true", help="turn the data-quality gate off")
    p.add_argument("--min-variance", type=float, default=0.01, help="the gate's pixel-variance floor (default 0.01)")
    p.add_argument("--hist-threshold", type=float, help="the gate's histogram distance limit (default: the "
                   "profile's calibrated one, else 0.9)")
    p.add_argument("--canary-share", type=float, default=0.05, help="share of request keys the canary serves "
                   "while NAME@canary is set (default 0.05)")
    p.add_argument("--shadow-share", type=float, default=1.0, help="share of requests mirrored to NAME@shadow "
                   "while it is set (default 1)")
    p.add_argument("--shadow-process", action="store_true", help="run NAME@shadow in its own process (needs "
                   "--store; it writes the shadow's records there): production no longer shares its interpreter "
                   "with the shadow's model")
    p.add_argument("--capture-dir", metavar="DIR", help="keep a share of the accepted production requests' images "
                   "as .npz shards in DIR, indexed in the --store (the retrain pipelines' --data)")
    p.add_argument("--capture-share", type=float, default=0.1, help="share of requests captured, chosen by a hash "
                   "of the request id (default 0.1)")
    p.add_argument("--capture-shard-images", type=int, default=1000, help="images per capture shard (default 1000)")
    p.add_argument("--capture-max-age", type=float, metavar="SECONDS", help="retention: delete capture shards "
                   "whose last image is older (default: keep)")
    p.add_argument("--capture-max-images", type=int, help="retention: keep at most this many captured images, "
                   "the newest (default: keep all)")
    p.add_argument("--access-log", action="store_true", help="log every request (off: it costs latency)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def _reference(args: argparse.Namespace) -> tuple[str, str | None]:
    ref, name = args.model, args.name
    p = Path(ref)
    if (p / "model" / "config.json").is_file():  # a run folder: serve its final model, named after the run
        return str(p / "model"), name or p.resolve().name
    return ref, name


def capture_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Capture keyword arguments of the ``--capture-*`` flags (checked by Capture itself)."""
    return {"shard_images": args.capture_shard_images, "max_age_s": args.capture_max_age,
            "max_images": args.capture_max_images}


def run(args: argparse.Namespace) -> int:
    import uvicorn

    check_positive("--port", args.port, allow_zero=True, integer=True)
    check_positive("--workers", args.workers, integer=True)
    if args.port > 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    ref, name = _reference(args)
    if args.capture_dir and not args.store:
        raise ConfigError(f"--capture-dir {args.capture_dir} needs --store: the capture index and its retention live "
                          "in the monitoring store (give --store alone for sqlite:///monitoring/records.db)")
    check_share("--capture-share", args.capture_share)
    cfg = {"reference": ref, "name": name, "device": args.device, "max_batch_size": args.max_batch_size,
           "max_wait_ms": args.max_wait_ms, "latent_norm_limit": args.latent_norm_limit,
           "max_images": args.max_images, "poll_interval_s": args.poll_interval, "threads": args.threads,
           "max_body_bytes": args.max_body_bytes, "records": args.records, "registry": args.registry,
           "store": args.store, "gate": not args.no_gate, "min_variance": args.min_variance,
           "hist_threshold": args.hist_threshold, "canary_share": args.canary_share,
           "shadow_share": args.shadow_share, "capture_dir": args.capture_dir, "capture_share": args.capture_share,
           "capture_options": capture_options(args), "shadow_process": args.shadow_process}
    common = dict(host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log)
    from vaekit.serving.sources import RegistrySource, resolve_source

    source = resolve_source(ref, name, args.registry)  # fail here, once, naming the reference
    if args.poll_interval is None and isinstance(source, RegistrySource) and source.follows:
        cfg["poll_interval_s"] = 10.0  # an alias can move at any time: look every 10 s
    if args.workers > 1:
        os.environ["VAEKIT_SERVE_CONFIG"] = json.dumps(cfg)
        uvicorn.run("vaekit.serving.app:app_from_env", factory=True, workers=args.workers, **common)
        return 0
    from vaekit.serving.app import _routing, create_app
    from vaekit.serving.records import JsonlSink
    from vaekit.serving.service import ModelService

    service = ModelService(source, device=args.device, max_batch_size=args.max_batch_size,
                           max_wait_ms=args.max_wait_ms, latent_norm_limit=args.latent_norm_limit,
                           max_images=args.max_images, poll_interval_s=cfg["poll_interval_s"], threads=args.threads,
                           sink=JsonlSink(args.records) if args.records else None, store=args.store,
                           gate=not args.no_gate, min_variance=args.min_variance,
                           hist_threshold=args.hist_threshold, routing=_routing(cfg), capture=args.capture_dir,
                           capture_share=args.capture_share, capture_options=cfg["capture_options"],
                           shadow_process=args.shadow_process)
    # uvicorn turns SIGTERM / SIGINT into a graceful shutdown: it stops accepting, lets requests in
    # flight finish, then the app's lifespan closes the service, which writes every queued record
    service.start()  # load and warm up before binding: a bad model fails here with its error
    info = service.describe()
    print(f"vaekit serve: {info['name']} version {info['version']} ({info['family']}) on {info['device']}, "
          f"http://{args.host}:{args.port}", flush=True)
    if args.store:
        print(f"vaekit serve: request records -> {args.store}", flush=True)
    if args.capture_dir:
        print(f"vaekit serve: capturing {args.capture_share:.0%} of accepted requests -> {args.capture_dir}",
              flush=True)
    uvicorn.run(create_app(service, max_body_bytes=args.max_body_bytes), **common)
    return 0
