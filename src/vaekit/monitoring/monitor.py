"""The monitor process: score windows of the record store with the drift detectors, on a schedule.

``Monitor(store, registry, model).run(interval_s=60)`` is what ``vaekit monitor run`` runs, as its
own process: the service only writes records; the drift tests never run in the request path.
Each iteration (:meth:`Monitor.run_once`), for every (version, route) of ``model`` with records in
the last ``window_s`` seconds:

1. the version's detectors are fitted once on its reference profile (``read_profile`` of the
   registered artifact -> ``reference_from_profile``) and cached; a detector the family cannot
   feed (no KL, no latent vector) is skipped, with the reason kept in :attr:`Monitor.skipped`;
2. with at least ``min_requests`` accepted records in the window, every fitted detector scores
   ``store.window(...)``; the results are stored (``monitor_results``: the dashboard's p-values);
3. ``evaluate_rules`` turns them into firing / resolved events against the alerts already firing
   for that route. The events are stored (``monitor_alerts``) and then handed to the sinks.

The firing state is rebuilt from the stored events when a monitor starts, so a restarted monitor
neither fires again what already fires nor forgets to resolve it. Several service processes (or
machines) may write to one PostgreSQL store: the monitor reads whatever they committed. Run one
monitor per model and store: two would each emit the same events.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from vaekit.errors import InputError, VaekitError, describe
from vaekit.monitoring.alerts import Alert, AlertState, Rule, default_rules, evaluate_rules, iso
from vaekit.monitoring.detectors import Detector, DetectorResult, GateRejectionDetector, default_detectors
from vaekit.monitoring.reference import reference_from_profile

log = logging.getLogger("vaekit.monitoring.monitor")


@dataclass
class GroupResult:
    """One (version, route) in one iteration: ``n`` accepted requests in the window, the detector
    results (empty when ``n < min_requests`` or the version has no profile), why detectors were
    skipped, and the alert events produced."""

    version: str
    route: str
    n: int
    results: dict[str, DetectorResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    events: list[Alert] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "route": self.route, "n": self.n,
                "results": {k: _plain(r.to_dict()) for k, r in self.results.items()}, "skipped": dict(self.skipped),
                "events": [e.to_dict() for e in self.events]}


@dataclass
class Iteration:
    """What :meth:`Monitor.run_once` did: the window [start, end) (Unix s) and one entry per group."""

    start: float
    end: float
    groups: list[GroupResult]
    sink_errors: list[str] = field(default_factory=list)

    @property
    def events(self) -> list[Alert]:
        return [e for g in self.groups for e in g.events]

    def to_dict(self) -> dict[str, Any]:
        return {"window": [iso(self.start), iso(self.end)], "groups": [g.to_dict() for g in self.groups],
                "sink_errors": list(self.sink_errors)}


def _plain(doc: dict[str, Any]) -> dict[str, Any]:
    """A DetectorResult dict without the per-dimension details (kept small for JSON output)."""
    return {k: v for k, v in doc.items() if k != "details"}


def _check_number(name: str, value: Any, *, integer: bool = False, low: float = 0.0) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int if integer else int | float)
    if not ok or not value > low or (not integer and not math.isfinite(value)):
        kind = "an integer" if integer else "a number"
        raise InputError(f"{name} must be {kind} > {low:g}, got {describe(value)}")


class Monitor:
    """Drift detection over the record store for one registered model (see the module docstring).

    ``store``: a :class:`~vaekit.monitoring.store.RecordStore` or its URI; ``registry``: a
    :class:`~vaekit.registry.ModelRegistry` or its URI (where the versions' reference profiles
    are); ``model``: the registered name (records carry the same name); ``window_s``: seconds of
    records scored per iteration; ``min_requests``: fewer accepted records than this in a window
    and the group is not scored (no events: missing data neither raises nor resolves);
    ``rules``: the alert rules; ``sinks``: objects with ``emit(alerts)`` (and optionally
    ``observe(results, version)``, as PrometheusSink); ``alpha``: the detectors' level;
    ``hooks``: callables ``hook(monitor, iteration)`` run after each iteration, once its events are
    stored and sent (e.g. :class:`vaekit.deploy.trigger.RetrainTrigger`; a hook that raises is
    logged and listed in the iteration's ``sink_errors``, like a sink).
    """

    def __init__(self, store: Any, registry: Any, model: str, *, window_s: float = 300.0, min_requests: int = 200,
                 rules: Sequence[Rule] | None = None, sinks: Sequence[Any] = (), alpha: float = 0.01,
                 hooks: Sequence[Callable[[Monitor, Iteration], Any]] = ()):
        from vaekit.monitoring.store import RecordStore
        from vaekit.registry import ModelRegistry

        if not isinstance(model, str) or not model:
            raise InputError(f"model must be a non-empty model name, got {describe(model)}")
        _check_number("window_s", window_s)
        _check_number("min_requests", min_requests, integer=True, low=1)
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
            raise InputError(f"alpha must be a number in (0, 1), got {describe(alpha)}")
        rules = default_rules() if rules is None else list(rules)
        if not rules or not all(isinstance(r, Rule) for r in rules):
            raise InputError(f"rules must be a non-empty sequence of Rule, got {describe(rules)}")
        for s in sinks:
            if not callable(getattr(s, "emit", None)):
                raise InputError(f"every sink needs an emit(alerts) method, got {type(s).__name__}")
        self._own_store = isinstance(store, str)
        self.store = RecordStore(store) if isinstance(store, str) else store
        self._own_registry = isinstance(registry, str)
        self.registry = ModelRegistry(registry) if isinstance(registry, str) else registry
        self.model, self.window_s, self.min_requests = model, float(window_s), int(min_requests)
        self.rules, self.sinks, self.alpha = rules, list(sinks), float(alpha)
        if not all(callable(h) for h in hooks):
            raise InputError(f"every hook must be callable as hook(monitor, iteration), got {describe(list(hooks))}")
        self.hooks = list(hooks)
        self._detectors: dict[str, dict[str, Detector]] = {}  # version -> fitted detectors
        self.skipped: dict[str, dict[str, str]] = {}  # version -> detector -> why it is not run
        self.state: dict[str, AlertState] = rebuild_state(self.store.alert_events(model, limit=10**9))
        self.iterations = 0

    def close(self) -> None:
        if self._own_store:
            self.store.close()
        if self._own_registry:
            self.registry.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- detectors per version -------------------------------------------------------------------
    def detectors(self, version: str) -> dict[str, Detector]:
        """The fitted detectors of ``version`` (fitted on its reference profile once, then cached)."""
        if version in self._detectors:
            return self._detectors[version]
        from vaekit.registry.profile import read_profile

        fitted: dict[str, Detector] = {}
        skipped: dict[str, str] = {}
        try:
            v = self.registry.get(f"{self.model}/{version}")
            reference = reference_from_profile(read_profile(v.artifact_path))
        except VaekitError as exc:  # not registered, no profile, a damaged artifact: nothing to compare with
            skipped["*"] = f"no reference profile for {self.model}/{version}: {exc}"
            if self.skipped.get(version) != skipped:  # once per version, not every iteration
                log.warning("monitor: %s", skipped["*"])
            self.skipped[version] = skipped
            return fitted  # not cached: the version may be registered (or repaired) later
        else:
            for name, det in default_detectors(self.alpha, kl=reference.kl is not None).items():
                try:
                    fitted[name] = det.fit(reference)
                except VaekitError as exc:  # the family lacks the field (no KL, no latent vector)
                    skipped[name] = str(exc)
        self._detectors[version], self.skipped[version] = fitted, skipped
        return fitted

    # -- one iteration ---------------------------------------------------------------------------
    def run_once(self, now: float | None = None) -> Iteration:
        """Score the window [now - window_s, now) of every (version, route); store and emit the events."""
        end = time.time() if now is None else float(now)
        start = end - self.window_s
        it = Iteration(start, end, [])
        for version, route in self.store.versions(self.model, start, end):
            it.groups.append(self._score_group(version, route, start, end))
        events = it.events
        for g in it.groups:
            if g.results:
                self.store.append_results(self.model, end, g.version, g.route, g.results.values())
            if g.events:
                self.store.append_alerts([{**e.to_dict(), "route": g.route} for e in g.events], self.model)
        routed = [replace(e, fingerprint=f"{e.fingerprint}/{g.route}",
                          message=f"{self.model} {e.message} [route {g.route}]")
                  for g in it.groups for e in g.events]
        for sink in self.sinks:
            try:
                for g in it.groups:
                    if g.results and callable(getattr(sink, "observe", None)):
                        sink.observe(g.results, g.version)
                if routed:
                    sink.emit(routed)
            except Exception as exc:  # a sink down must not stop the monitor: the events are stored already
                msg = f"{type(sink).__name__}: {type(exc).__name__}: {exc}"
                it.sink_errors.append(msg)
                log.error("monitor: sink failed: %s", msg)
        for hook in self.hooks:
            try:
                hook(self, it)
            except Exception as exc:  # a hook's fault must not stop the monitor
                it.sink_errors.append(f"hook {getattr(hook, '__name__', type(hook).__name__)}: "
                                      f"{type(exc).__name__}: {exc}")
                log.exception("monitor: hook failed")
        self.iterations += 1
        if events:
            log.info("monitor: %d alert event(s) in window %s .. %s", len(events), iso(start), iso(end))
        return it

    def _score_group(self, version: str, route: str, start: float, end: float) -> GroupResult:
        n = self.store.count(self.model, version, route, start, end, accepted=True)
        g = GroupResult(version, route, n)
        detectors = self.detectors(version)
        g.skipped = dict(self.skipped.get(version, {}))
        self._score_gate(g, start, end)
        if n < self.min_requests or not detectors:
            if n < self.min_requests:
                g.skipped["*"] = f"{n} accepted request(s) in the window, fewer than min_requests={self.min_requests}"
            return self._evaluate(g, start, end) if g.results else g
        window = self.store.window(self.model, version, route, start, end)
        for name, det in detectors.items():
            try:
                g.results[name] = det.score(window)
            except VaekitError as exc:  # e.g. too few requests in the rolling period
                g.skipped[name] = str(exc)
        return self._evaluate(g, start, end)

    def _score_gate(self, g: GroupResult, start: float, end: float) -> None:
        """The gate's rejection share over all the window's images (accepted or not; needs no profile), when
        they are at least ``min_requests``: a window of refused images has too few accepted ones to score."""
        counts = self.store.gate_counts(self.model, g.version, g.route, start, end)
        if counts.n >= self.min_requests:
            g.results[GateRejectionDetector.name] = GateRejectionDetector(alpha=self.alpha).fit().score(counts)

    def _evaluate(self, g: GroupResult, start: float, end: float) -> GroupResult:
        """The alert events of one scored group against the alerts firing for its route."""
        version, route = g.version, g.route
        state = self.state.get(route, AlertState())
        g.events = evaluate_rules(self.rules, g.results, state, version=version, window=(start, end))
        self.state[route] = state.apply(g.events)
        return g

    def run(self, interval_s: float = 60.0, iterations: int | None = None,
            stop: Any = None) -> list[Iteration]:
        """Run an iteration every ``interval_s`` seconds, ``iterations`` times (None: until ``stop``
        (a threading.Event) is set or the process is interrupted). A failing iteration (the database
        gone for a moment) is logged and the next one tried; the last ``iterations`` are returned."""
        _check_number("interval_s", interval_s)
        if iterations is not None:
            _check_number("iterations", iterations, integer=True)
        return run_every(self.run_once, interval_s, iterations, stop, "monitor: iteration")

    def firing(self) -> list[dict[str, Any]]:
        """The alerts firing now, with their route."""
        return [{**a.to_dict(), "route": route} for route, st in sorted(self.state.items())
                for a in st.firing.values()]


def run_every(fn: Callable[[], Any], interval_s: float, iterations: int | None, stop: Any, what: str) -> list[Any]:
    """Call ``fn`` every ``interval_s`` seconds (measured start to start), ``iterations`` times (None:
    until ``stop``, a threading.Event, is set, or the process is interrupted); the results are kept
    when ``iterations`` is given. A VaekitError (a configuration fault: retrying will not help) is
    raised; any other failure (the database unreachable for a while) is logged as ``what`` and the
    next call tried. The monitor and the FID job share this schedule."""
    done: list[Any] = []
    k = 0
    while iterations is None or k < iterations:
        t0 = time.monotonic()
        try:
            result = fn()
            if iterations is not None:
                done.append(result)
        except VaekitError:
            raise
        except Exception as exc:
            log.error("%s failed: %s: %s", what, type(exc).__name__, exc)
        k += 1
        if iterations is not None and k >= iterations:
            break
        wait = max(0.0, interval_s - (time.monotonic() - t0))
        if stop is not None:
            if stop.wait(wait):
                break
        else:
            time.sleep(wait)
    return done


def rebuild_state(docs: Sequence[dict[str, Any]]) -> dict[str, AlertState]:
    """The firing alerts per route from stored alert events (oldest first): the last event of each
    rule and version decides."""
    firing: dict[str, dict[str, Alert]] = {}
    for doc in docs:
        route = str(doc.get("route", "production"))
        key = f"{doc['rule']}@{doc['version']}"
        by_key = firing.setdefault(route, {})
        if doc.get("status") == "firing":
            by_key[key] = alert_from_doc(doc, key)
        else:
            by_key.pop(key, None)
    return {route: AlertState(dict(a)) for route, a in firing.items()}


def alert_from_doc(doc: dict[str, Any], fingerprint: str | None = None) -> Alert:
    """An :class:`Alert` from its stored ``to_dict()``."""
    return Alert(rule=doc["rule"], status=doc["status"], detector=doc.get("detector", ""),
                 version=str(doc["version"]), value=float(doc.get("value") or 0.0), threshold=doc.get("threshold"),
                 p_value=doc.get("p_value"), window=tuple(doc.get("window") or ("", "")),
                 severity=doc.get("severity", "warning"), at=doc["at"], since=doc.get("since", doc["at"]),
                 fingerprint=fingerprint or doc.get("fingerprint", ""), message=doc.get("message", ""))


def firing_alerts(docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stored alert events still firing (no later resolved event for their rule, version and route)."""
    return [{**a.to_dict(), "route": route} for route, st in sorted(rebuild_state(docs).items())
            for a in st.firing.values()]
