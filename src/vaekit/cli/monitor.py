"""``vaekit monitor ...``: the monitor process and its views for a person.

* ``run``: score windows of the record store with the drift detectors on a schedule, store the alert events
  and send them to the log, a webhook (``--webhook URL``) and Prometheus gauges (``--metrics-port``);
  its own process, beside one or several services writing to the store. SIGTERM / SIGINT end it after the
  iteration in progress.
* ``status``: per version and route, the requests in the window, the latest 5-minute rollup, the firing alerts.
* ``alerts``: the stored alert events (``--firing``: only those firing now).
* ``report``: all of it as Markdown or JSON (``-o FILE.md`` / ``-o FILE.json``; stdout: Markdown).
* ``dashboard``: the HTML dashboard, served on 127.0.0.1 (``--port``) or written to ``-o FILE.html``.

The store is ``--store URI`` (else ``$VAEKIT_STORE``); the registry ``--registry URI`` (else
``$VAEKIT_REGISTRY``, else sqlite:///registry/registry.db). Exit codes: 0 done, 2 a usage or
configuration error (one line on stderr), 3 (``status`` / ``alerts --firing`` with ``--fail-on-firing``)
when an alert fires, 130 interrupted.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from vaekit.cli.common import db_errors_as
from vaekit.errors import ConfigError, InputError, VaekitError

ENV_STORE = "VAEKIT_STORE"
EXIT_FIRING = 3


def add_parser(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", metavar="URI", help=f"record store: sqlite:///PATH or postgresql://... "
                                                       f"(default: ${ENV_STORE})")
    common.add_argument("--model", required=True, help="the registered model name the records carry")
    common.add_argument("--window-s", type=float, default=300.0, help="seconds of records per window (default 300)")
    reg = argparse.ArgumentParser(add_help=False)
    reg.add_argument("--registry", metavar="URI", help="registry URI (default: $VAEKIT_REGISTRY, else "
                                                       "sqlite:///registry/registry.db)")
    reg.add_argument("--artifacts", metavar="DIR", help="the registry's artifact folder (default: the one it recorded)")

    p = sub.add_parser("monitor", help="drift detection over the record store: run, status, alerts, report, dashboard")
    verbs = p.add_subparsers(dest="verb", required=True)

    r = verbs.add_parser("run", parents=[common, reg], help="evaluate the detectors over store windows on a schedule")
    r.add_argument("--interval", type=float, default=60.0, help="seconds between iterations (default 60)")
    r.add_argument("--min-requests", type=int, default=200,
                   help="score a version/route only with this many accepted requests in the window (default 200)")
    r.add_argument("--alpha", type=float, default=0.01, help="the detectors' level (default 0.01)")
    r.add_argument("--webhook", metavar="URL", help="POST alert events as JSON to this URL")
    r.add_argument("--metrics-port", type=int, help="expose Prometheus gauges on 127.0.0.1:PORT/metrics")
    once = r.add_mutually_exclusive_group()
    once.add_argument("--once", action="store_true", help="one iteration, then exit")
    once.add_argument("--iterations", type=int, help="this many iterations, then exit")
    r.add_argument("--json", action="store_true", help="print each iteration as a JSON line")
    r.add_argument("--on-alert-retrain", metavar="RULE[,RULE]", help="start `vaekit retrain emergency` (its own "
                   "process) once per alert episode of these rules on NAME@production (needs --capture-dir)")
    r.add_argument("--capture-dir", metavar="DIR", help="the service's capture folder: the retrain's --data")
    r.add_argument("--retrain-out", default="pipelines/triggered", metavar="DIR",
                   help="where each episode's pipeline folder goes (default pipelines/triggered)")
    r.add_argument("--retrain-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for `vaekit retrain` (repeat: --retrain-arg=--epochs --retrain-arg=3)")
    r.set_defaults(func=_db(run))

    s = verbs.add_parser("status", parents=[common], help="requests, latest rollup and firing alerts per version/route")
    s.add_argument("--json", action="store_true")
    s.add_argument("--fail-on-firing", action="store_true", help=f"exit {EXIT_FIRING} when an alert fires")
    s.set_defaults(func=_db(status))

    a = verbs.add_parser("alerts", parents=[common], help="the stored alert events")
    a.add_argument("--firing", action="store_true", help="only the alerts firing now")
    a.add_argument("--limit", type=int, default=50, help="the newest N events (default 50)")
    a.add_argument("--json", action="store_true")
    a.add_argument("--fail-on-firing", action="store_true", help=f"exit {EXIT_FIRING} when an alert fires")
    a.set_defaults(func=_db(alerts))

    rp = verbs.add_parser("report", parents=[common], help="a Markdown or JSON report of the last hours")
    rp.add_argument("--hours", type=float, default=24.0, help="period covered (default 24)")
    rp.add_argument("-o", "--output", metavar="FILE.md|FILE.json", help="write here (default: Markdown on stdout)")
    rp.set_defaults(func=_db(report))

    d = verbs.add_parser("dashboard", parents=[common, reg], help="the HTML dashboard: served, or written to a file")
    d.add_argument("--hours", type=float, default=24.0, help="period shown (default 24)")
    where = d.add_mutually_exclusive_group()
    where.add_argument("--port", type=int, default=8050, help="serve on this port (default 8050)")
    where.add_argument("-o", "--output", metavar="FILE.html", help="write the page to this file and exit")
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    d.add_argument("--no-registry", action="store_true", help="leave out the alias moves")
    d.set_defaults(func=_db(dashboard))
    _add_fid_parser(verbs, reg)


def _add_fid_parser(verbs: argparse._SubParsersAction, reg: argparse.ArgumentParser) -> None:
    """``vaekit monitor fid``: the scheduled FID job (model drift from generated samples)."""
    f = verbs.add_parser("fid", parents=[reg], help="FID of generated samples vs a calibrated threshold, "
                                                    "once or every N seconds")
    f.add_argument("--store", metavar="URI", help=f"record store (default: ${ENV_STORE})")
    f.add_argument("--model", required=True, metavar="REF",
                   help="NAME@ALIAS (followed at each check), NAME/VERSION, or NAME (= NAME@production)")
    f.add_argument("--n-samples", type=int, default=2000, help="generated images per FID (default 2000)")
    f.add_argument("--dataset", help="the extractor's dataset (default: the version's training data)")
    f.add_argument("--extractor", metavar="DIR", help="FID extractor artifact (default: the cached one)")
    f.add_argument("--multiple", type=float, default=3.0, help="threshold margin in split-half FIDs (default 3)")
    f.add_argument("--repeats", type=int, default=3, help="baseline draws when calibrating (default 3)")
    f.add_argument("--calibrate", action="store_true", help="calibrate anew on the version REF names now")
    f.add_argument("--webhook", metavar="URL", help="POST alert events as JSON to this URL")
    when = f.add_mutually_exclusive_group()
    when.add_argument("--every", type=float, metavar="SECONDS", help="check every SECONDS (default: once)")
    when.add_argument("--once", action="store_true", help="one check, then exit (for cron; the default)")
    f.add_argument("--iterations", type=int, help="with --every: this many checks, then exit")
    f.add_argument("--json", action="store_true", help="print each check as a JSON line")
    f.add_argument("--fail-on-drift", action="store_true", help=f"exit {EXIT_FIRING} when the last check drifted")
    f.set_defaults(func=_db(fid))


_db = db_errors_as(VaekitError)


def _store_uri(args: argparse.Namespace) -> str:
    uri = args.store or os.environ.get(ENV_STORE)
    if not uri:
        raise ConfigError(f"no record store: give --store URI (sqlite:///PATH or postgresql://...) or set {ENV_STORE}")
    if not uri.startswith(("sqlite:", "postgresql")):
        raise ConfigError(f"--store must be a sqlite:///PATH or postgresql://... URI, got {uri!r}")
    return uri


def _open_store(args: argparse.Namespace) -> Any:
    from vaekit.monitoring.store import RecordStore

    uri = _store_uri(args)
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        # reading a store that is not there is a typo, not a new store
        if path and not os.path.exists(path) and getattr(args, "verb", "") != "run":
            raise ConfigError(f"--store {uri}: no such file {path}")
    return RecordStore(uri)


def _open_registry(args: argparse.Namespace) -> Any:
    from vaekit.registry import ModelRegistry

    return ModelRegistry(args.registry, artifact_root=args.artifacts)


def _positive(name: str, v: float | int | None, integer: bool = False) -> None:
    if v is not None and (not v > 0 or (integer and int(v) != v)):
        raise InputError(f"{name} must be {'an integer' if integer else 'a number'} > 0, got {v}")


# -- run ---------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from vaekit.monitoring.monitor import Monitor
    from vaekit.monitoring.sinks import LogSink, PrometheusSink, WebhookSink

    for name, v in (("--interval", args.interval), ("--window-s", args.window_s)):
        _positive(name, v)
    _positive("--iterations", args.iterations, integer=True)
    _positive("--min-requests", args.min_requests, integer=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sinks: list[Any] = [LogSink()]
    if args.webhook:
        sinks.append(WebhookSink(args.webhook))
    if args.metrics_port is not None:
        from prometheus_client import CollectorRegistry, start_http_server

        if not 0 < args.metrics_port < 65536:
            raise InputError(f"--metrics-port must be in [1, 65535], got {args.metrics_port}")
        prom = CollectorRegistry()
        sinks.append(PrometheusSink(prom))
        start_http_server(args.metrics_port, addr="127.0.0.1", registry=prom)
    store, registry = _open_store(args), _open_registry(args)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # finish the iteration in progress, then stop
        signal.signal(sig, lambda *_: stop.set())
    iterations = 1 if args.once else args.iterations
    mon = Monitor(store, registry, args.model, window_s=args.window_s, min_requests=args.min_requests,
                  sinks=sinks, alpha=args.alpha, hooks=_hooks(args))
    for hook in mon.hooks:
        hook.check_rules([rule.name for rule in mon.rules])
    log = logging.getLogger("vaekit.monitoring.monitor")
    try:
        k = 0
        while not stop.is_set() and (iterations is None or k < iterations):
            t0 = time.monotonic()
            k += 1
            try:
                it = mon.run_once()
            except VaekitError:
                raise  # configuration (a newer schema, a bad argument): retrying will not help
            except Exception as exc:  # the database unreachable for a while: try again next time
                log.error("monitor: iteration failed: %s: %s", type(exc).__name__, exc)
            else:
                _print_iteration(args, it)
            if iterations is not None and k >= iterations:
                break
            stop.wait(max(0.0, args.interval - (time.monotonic() - t0)))
    finally:
        store.close()
        registry.close()
    return 0


def _hooks(args: argparse.Namespace) -> list[Any]:
    """The ``--on-alert-retrain`` trigger (vaekit.deploy.trigger), or none."""
    if not args.on_alert_retrain:
        if args.capture_dir:
            raise ConfigError("--capture-dir is the retrain's data: give --on-alert-retrain RULE[,RULE] with it")
        return []
    if not args.capture_dir:
        raise ConfigError(f"--on-alert-retrain {args.on_alert_retrain} needs --capture-dir DIR (the service's "
                          "capture folder, what the emergency retrain trains on)")
    from vaekit.deploy.trigger import RetrainTrigger

    rules = [r.strip() for r in args.on_alert_retrain.split(",") if r.strip()]
    return [RetrainTrigger(rules, args.capture_dir, args.retrain_out, artifacts=args.artifacts,
                           extra_args=args.retrain_arg)]


def _print_iteration(args: argparse.Namespace, it: Any) -> None:
    if args.json:
        print(json.dumps(it.to_dict()), flush=True)
        return
    end = it.to_dict()["window"][1]
    for g in it.groups:
        why = f" ({g.skipped['*']})" if "*" in g.skipped else ""
        drifted = sorted(r for r, res in g.results.items() if res.drifted)
        print(f"{end}  v{g.version} {g.route}: {g.n} request(s), {len(g.results)} detector(s) scored{why}; "
              f"drifted: {', '.join(drifted) or 'none'}; "
              f"events: {', '.join(f'{e.rule} {e.status}' for e in g.events) or 'none'}", flush=True)
    if not it.groups:
        print(f"{end}  no records of {args.model!r} in the last {args.window_s:g} s", flush=True)


# -- fid -----------------------------------------------------------------------------------------------
def fid(args: argparse.Namespace) -> int:
    """The FID job: one check (default, for cron) or one every ``--every`` seconds until SIGTERM / SIGINT."""
    from vaekit.evaluation.extractor import load_extractor
    from vaekit.monitoring.fid_watch import FIDWatch
    from vaekit.monitoring.sinks import LogSink, WebhookSink

    _positive("--every", args.every)
    _positive("--iterations", args.iterations, integer=True)
    ref = args.model if ("@" in args.model or "/" in args.model) else f"{args.model}@production"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sinks: list[Any] = [LogSink()] + ([WebhookSink(args.webhook)] if args.webhook else [])
    store, registry = _open_store(args), _open_registry(args)
    stop = threading.Event()
    before = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:  # SIGTERM / SIGINT: finish the check in progress, then stop
        ext = None
        if args.extractor:
            ext = load_extractor(args.dataset or ref.split("@")[0].split("/")[0], args.extractor)
        watch = FIDWatch(store, registry, ref, n_samples=args.n_samples, dataset=args.dataset, extractor=ext,
                         sinks=sinks, multiple=args.multiple, repeats=args.repeats)
        iterations = 1 if args.every is None else args.iterations
        k, check, recalibrate = 0, None, args.calibrate
        while not stop.is_set() and (iterations is None or k < iterations):
            t0 = time.monotonic()
            k += 1
            check = watch.run_once(recalibrate=recalibrate)
            recalibrate = False
            _print_fid(args, ref, check)
            if iterations is not None and k >= iterations:
                break
            stop.wait(max(0.0, args.every - (time.monotonic() - t0)))
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        store.close()
        registry.close()
    return EXIT_FIRING if args.fail_on_drift and check is not None and check.result.drifted else 0


def _print_fid(args: argparse.Namespace, ref: str, check: Any) -> None:
    if args.json:
        print(json.dumps(check.to_dict()), flush=True)
        return
    cal = check.calibration
    print(f"{check.to_dict()['at']}  {ref}: FID {check.fid:.3f} of {cal.n_samples} samples (version "
          f"{check.version}); threshold {cal.threshold:.3f} = baseline {cal.baseline:.3f} (version {cal.version}) "
          f"+ {cal.margin:.3f}; {'DRIFT' if check.result.drifted else 'ok'}; events: "
          f"{', '.join(f'{e.rule} {e.status}' for e in check.events) or 'none'}", flush=True)


# -- status / alerts ---------------------------------------------------------------------------------
def _status_doc(store: Any, model: str, window_s: float, now: float | None = None) -> dict[str, Any]:
    from vaekit.monitoring.alerts import iso
    from vaekit.monitoring.monitor import firing_alerts

    end = time.time() if now is None else now
    start = end - window_s
    firing = firing_alerts(store.alert_events(model, limit=10**9))
    groups = []
    pairs = set(store.versions(model, start, end)) | {(str(a["version"]), a["route"]) for a in firing}
    rollups = store.rollups(model, 300.0, end - 3600, end)
    for version, route in sorted(pairs):
        mine = [r for r in rollups if (r["version"], r["route"]) == (version, route)]
        latest = dict(mine[-1]) if mine else None
        if latest is not None:
            latest["start"] = iso(latest["start"])
        groups.append({"version": version, "route": route,
                       "requests": store.count(model, version, route, start, end),
                       "accepted": store.count(model, version, route, start, end, accepted=True),
                       "latest_rollup": latest,
                       "firing": [a for a in firing if (str(a["version"]), a["route"]) == (version, route)]})
    return {"model": model, "window": [iso(start), iso(end)], "groups": groups, "firing": firing}


def status(args: argparse.Namespace) -> int:
    _positive("--window-s", args.window_s)
    store = _open_store(args)
    try:
        doc = _status_doc(store, args.model, args.window_s)
    finally:
        store.close()
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"{args.model}: window {doc['window'][0]} .. {doc['window'][1]}")
        if not doc["groups"]:
            print(f"  no records in the last {args.window_s:g} s and no alert firing")
        for g in doc["groups"]:
            r = g["latest_rollup"]
            roll = (f"latest 5 min from {r['start']}: n={r['n']} rejected={r['rejected']} "
                    f"recon_mse mean={_f(r['recon_mse_mean'])} p99={_f(r['recon_mse_p99'])} kl={_f(r['kl_mean'])} "
                    f"|mu|={_f(r['latent_norm_mean'])}") if r else "no rollup in the last hour"
            print(f"  v{g['version']} {g['route']}: {g['requests']} request(s) ({g['accepted']} accepted); {roll}")
            for a in g["firing"]:
                print(f"    FIRING {a['rule']} ({a['severity']}) since {a['since']}: {a['message']}")
    return EXIT_FIRING if args.fail_on_firing and doc["firing"] else 0


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def alerts(args: argparse.Namespace) -> int:
    from vaekit.monitoring.monitor import firing_alerts

    _positive("--limit", args.limit, integer=True)
    store = _open_store(args)
    try:
        events = store.alert_events(args.model, limit=10**9)
    finally:
        store.close()
    firing = firing_alerts(events)
    shown = firing if args.firing else events[-args.limit:]
    if args.json:
        print(json.dumps(shown, indent=2))
    elif not shown:
        print(f"{args.model}: {'no alert firing' if args.firing else 'no alert events stored'}")
    else:
        for e in shown:
            print(f"{e['at']}  {e['status']:<8} {e['rule']:<20} v{e['version']} {e.get('route', '-'):<10} "
                  f"{e.get('severity', ''):<8} {e.get('message', '')}")
    return EXIT_FIRING if args.fail_on_firing and firing else 0


# -- report ------------------------------------------------------------------------------------------
def report_doc(store: Any, model: str, hours: float, window_s: float, now: float | None = None) -> dict[str, Any]:
    """The report's data: status now, per-version/route totals over ``hours``, the latest detector
    results per version/route and the alert events of the period."""
    from vaekit.monitoring.alerts import iso

    end = time.time() if now is None else now
    start = end - hours * 3600
    doc = _status_doc(store, model, window_s, end)
    rollups = store.rollups(model, 300.0, start, end)
    totals: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rollups:
        t = totals.setdefault((r["version"], r["route"]), {"version": r["version"], "route": r["route"], "n": 0,
                                                           "rejected": 0, "buckets": 0})
        t["n"] += r["n"]
        t["rejected"] += r["rejected"]
        t["buckets"] += 1
    latest: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in store.results(model, start, end):
        latest.setdefault((r["version"], r["route"]), {})[r["detector"]] = {
            "at": iso(r["at"]), "statistic": r["statistic"], "p_value": r["p_value"], "threshold": r["threshold"],
            "drifted": r["drifted"], "n": r["n"]}
    events = [e for e in store.alert_events(model, limit=10**9) if e["at"] >= iso(start)]
    return {"model": model, "period": [iso(start), iso(end)], "status": doc, "totals": list(totals.values()),
            "latest_results": [{"version": v, "route": rt, "detectors": d} for (v, rt), d in sorted(latest.items())],
            "events": events}


def report_markdown(doc: dict[str, Any]) -> str:
    lines = [f"# Monitoring report: {doc['model']}", "", f"Period {doc['period'][0]} to {doc['period'][1]}.", ""]
    firing = doc["status"]["firing"]
    lines += ["## Firing now", ""]
    lines += [f"- **{a['rule']}** ({a['severity']}) on v{a['version']} {a['route']} since {a['since']}: {a['message']}"
              for a in firing] or ["No alert is firing."]
    lines += ["", "## Traffic", "", "| version | route | requests | gate rejections | 5-min buckets |",
              "|---|---|---|---|---|"]
    lines += [f"| {t['version']} | {t['route']} | {t['n']} | {t['rejected']} | {t['buckets']} |" for t in doc["totals"]]
    for g in doc["latest_results"]:
        lines += ["", f"## Latest detector results: v{g['version']} {g['route']}", "",
                  "| detector | at | n | statistic | p-value | threshold | drifted |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {r['at']} | {r['n']} | {_f(r['statistic'])} | {_f(r['p_value'])} | "
                  f"{_f(r['threshold'])} | {'**yes**' if r['drifted'] else 'no'} |"
                  for name, r in sorted(g["detectors"].items())]
    lines += ["", "## Alert events", ""]
    lines += [f"- {e['at']} {e['status']} {e['rule']} v{e['version']} {e.get('route', '')}: {e.get('message', '')}"
              for e in doc["events"]] or ["None in this period."]
    return "\n".join(lines) + "\n"


def report(args: argparse.Namespace) -> int:
    from vaekit.atomic import atomic_write_bytes
    from vaekit.cli.common import check_output_path

    _positive("--hours", args.hours)
    _positive("--window-s", args.window_s)
    if args.output and not args.output.endswith((".md", ".json")):
        raise InputError(f"-o must end in .md or .json, got {args.output!r}")
    out = check_output_path(args.output, "-o", "report.md") if args.output else None
    store = _open_store(args)
    try:
        doc = report_doc(store, args.model, args.hours, args.window_s)
    finally:
        store.close()
    text = json.dumps(doc, indent=2) + "\n" if out is not None and out.suffix == ".json" else report_markdown(doc)
    if out is None:
        sys.stdout.write(text)
    else:
        atomic_write_bytes(out, text.encode())
        print(f"wrote {out}")
    return 0


# -- dashboard ---------------------------------------------------------------------------------------
def dashboard(args: argparse.Namespace) -> int:
    from vaekit.monitoring.dashboard import render_dashboard

    _positive("--hours", args.hours)
    out = None
    if args.output:
        from vaekit.cli.common import check_output_path

        if not args.output.endswith((".html", ".htm")):
            raise InputError(f"-o must end in .html, got {args.output!r}")
        out = check_output_path(args.output, "-o", "dashboard.html")
    elif not 0 <= args.port < 65536:
        raise InputError(f"--port must be in [0, 65535], got {args.port}")
    store = _open_store(args)
    registry = None if args.no_registry else _open_registry(args)
    try:
        page = functools.partial(render_dashboard, store, args.model, registry, hours=args.hours)
        if out is not None:
            from vaekit.atomic import atomic_write_bytes

            atomic_write_bytes(out, page().encode())
            print(f"wrote {out}")
            return 0
        serve_page(page, args.host, args.port)
    finally:
        store.close()
        if registry is not None:
            registry.close()
    return 0


def serve_page(page: Callable[[], str], host: str, port: int) -> None:
    """Serve ``page()`` (rendered afresh per request) at / and /dashboard, ``/healthz`` for probes, until
    SIGTERM / SIGINT (stdlib http.server: the page is one GET, no framework needed)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                body, ctype, code = b"ok\n", "text/plain", 200
            elif path in ("/", "/dashboard"):
                try:
                    body, ctype, code = page().encode(), "text/html; charset=utf-8", 200
                except Exception as exc:  # a database hiccup: say so on the page, keep serving
                    body, ctype, code = f"dashboard error: {type(exc).__name__}: {exc}\n".encode(), "text/plain", 503
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    print(f"dashboard on http://{host}:{server.server_address[1]}/", flush=True)

    def stop(*_: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
