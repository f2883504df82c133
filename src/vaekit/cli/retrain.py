"""``vaekit retrain incremental|full|emergency``: the retraining pipelines (vaekit.deploy.pipelines).

Each step is recorded in ``OUT/NAME-KIND/pipeline.json``; the same command again continues a run
that stopped and repeats nothing that finished, so a scheduler (cron, a Kubernetes CronJob,
Airflow) can call it as it is. Exit status 0 when the candidate is registered (and its canary
started), 2 when a step refused (bad data, a failed benchmark suite) with the reason on stderr.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from vaekit.deploy.pipelines import KINDS, PipelineConfig, run_pipeline
from vaekit.deploy.suite import SuitePolicy
from vaekit.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrain", help="retrain NAME@production on captured data, gate it, register it, canary it")
    p.add_argument("kind", choices=KINDS, help="incremental: fine-tune the decoder at lr 1e-5 with a replay sample; "
                   "full: from scratch on everything; emergency: the most recent --recent images")
    p.add_argument("--name", required=True, help="registered model name (retrained from NAME@production)")
    p.add_argument("--data", required=True, help="captured images: a shard file or folder, or NAME[:train|test]")
    p.add_argument("--registry", help="registry URI (default: $VAEKIT_REGISTRY, else sqlite:///registry/registry.db)")
    p.add_argument("--artifacts", help="the registry's artifact folder when it is not beside the database")
    p.add_argument("--out", default="pipelines", help="parent folder of the pipeline's own folder")
    p.add_argument("--replay", help="replay sample (default: the production run's dataset)")
    p.add_argument("--replay-share", type=float, default=0.5)
    p.add_argument("--lr", type=float, help="learning rate (default: 1e-5 incremental, run lr / 10 emergency)")
    p.add_argument("--epochs", type=int, default=5, help="passes over the captured data (default 5)")
    p.add_argument("--recent", type=int, default=100_000, help="emergency: most recent images kept")
    p.add_argument("--tolerance", type=float, default=0.02, help="allowed loss on the original test split")
    p.add_argument("--examples", type=int, help="evaluate the suite on the first N test images of each distribution")
    p.add_argument("--parts", default="elbo,recon", help="report parts of the benchmark suite (e.g. elbo,recon,fid)")
    p.add_argument("--no-canary", action="store_true", help="register the candidate without starting a canary")
    p.add_argument("--store", metavar="URI", help="record store whose capture index lists --data's shards (a "
                   "vaekit serve --capture-dir folder); needed for --since / --until")
    p.add_argument("--since", metavar="TIME", help="only images captured at or after TIME (Unix seconds or ISO 8601; "
                   "naive times are UTC)")
    p.add_argument("--until", metavar="TIME", help="only images captured before TIME")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    p.set_defaults(func=run)


def parse_time(text: str | None, option: str) -> float | None:
    """Unix seconds from ``text``: a number, or an ISO 8601 time (UTC when it names no zone); None stays None."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{option} must be Unix seconds or an ISO 8601 time such as 2024-05-01T12:00:00Z, "
                          f"got {text!r}") from None
    return (t if t.tzinfo is not None else t.replace(tzinfo=UTC)).timestamp()


def run(args: argparse.Namespace) -> int:
    suite = SuitePolicy(parts=tuple(p.strip() for p in args.parts.split(",") if p.strip()), tolerance=args.tolerance,
                        examples=args.examples)
    cfg = PipelineConfig(kind=args.kind, name=args.name, data=args.data, out=args.out, registry=args.registry,
                         artifact_root=args.artifacts, replay=args.replay, replay_share=args.replay_share,
                         lr=args.lr, epochs=args.epochs, recent=args.recent, suite=suite,
                         canary=not args.no_canary, overrides=tuple(args.set), store=args.store,
                         since=parse_time(args.since, "--since"), until=parse_time(args.until, "--until"))
    state = run_pipeline(cfg)
    reg = state["steps"].get("register", {})
    print(f"done: {reg.get('ref')} registered from {state['production']}; "
          f"pipeline record {cfg.folder / 'pipeline.json'}")
    return 0
