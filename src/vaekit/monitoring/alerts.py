"""Alert rules: detector results -> alert events (firing / resolved), deduplicated.

``evaluate_rules(rules, results, state, version=..., window=...)`` is a pure function: it reads
the detector results of one window and the alerts already firing (``state``) and returns the
events to emit; ``state.apply(events)`` gives the next state. Nothing here does I/O: sinks
(vaekit.monitoring.sinks) deliver the events, the caller stores them.

Semantics, per rule and model version (the alert's ``fingerprint``):

* the rule's detector drifted and no alert is firing -> one ``firing`` event;
* it drifted and an alert is already firing -> nothing (deduplicated: one event per episode);
* it did not drift and an alert is firing -> one ``resolved`` event (``since`` = when it fired);
* the detector has no result for this window (too few requests, not run) -> nothing: missing
  data neither raises nor resolves an alert.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from vaekit.errors import InputError, check_choice, describe
from vaekit.monitoring.detectors import DetectorResult

SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True)
class Rule:
    """Alert when ``detector`` (a DetectorResult.detector name) reports drift."""

    name: str
    detector: str
    severity: str = "warning"  # one of SEVERITIES
    description: str = ""

    def __post_init__(self) -> None:
        for key in ("name", "detector"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise InputError(f"Rule.{key} must be a non-empty string, got {describe(value)}")
        check_choice("Rule.severity", self.severity, SEVERITIES)


@dataclass(frozen=True)
class Alert:
    """One alert event. Times are ISO 8601 UTC strings; ``window`` is (start, end) of the scored window."""

    rule: str
    status: str  # "firing" or "resolved"
    detector: str
    version: str
    value: float  # the detector's statistic
    threshold: float | None  # what the statistic was compared with (or alpha, for a p-value)
    p_value: float | None
    window: tuple[str, str]
    severity: str
    at: str  # when this event was produced (the end of the window)
    since: str  # when the episode started firing
    fingerprint: str  # rule and version: the deduplication key
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "status": self.status, "detector": self.detector, "version": self.version,
                "value": self.value, "threshold": self.threshold, "p_value": self.p_value,
                "window": list(self.window), "severity": self.severity, "at": self.at, "since": self.since,
                "fingerprint": self.fingerprint, "message": self.message}


@dataclass(frozen=True)
class AlertState:
    """The alerts firing now, by fingerprint. Immutable: :meth:`apply` returns a new state."""

    firing: Mapping[str, Alert] = field(default_factory=dict)

    def apply(self, events: Sequence[Alert]) -> AlertState:
        firing = dict(self.firing)
        for e in events:
            if e.status == "firing":
                firing[e.fingerprint] = e
            else:
                firing.pop(e.fingerprint, None)
        return AlertState(firing)


def iso(t: float) -> str:
    """Unix seconds -> ISO 8601 UTC with milliseconds."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def fingerprint(rule: str, version: str) -> str:
    return f"{rule}@{version}"


def evaluate_rules(rules: Sequence[Rule], results: Mapping[str, DetectorResult] | Sequence[DetectorResult],
                   state: AlertState, *, version: str, window: tuple[float, float]) -> list[Alert]:
    """The alert events for one scored window (see the module docstring); a pure function.

    ``results``: DetectorResults of the window, a mapping by detector name or a sequence;
    ``version``: the model version the window's requests were served by; ``window``: (start,
    end) Unix seconds of the window.
    """
    if not isinstance(state, AlertState):
        raise InputError(f"state must be an AlertState, got {type(state).__name__}")
    if not isinstance(version, str) or not version:
        raise InputError(f"version must be a non-empty string, got {describe(version)}")
    try:
        start, end = (float(t) for t in window)
    except (TypeError, ValueError):
        raise InputError(f"window must be (start, end) Unix seconds, got {describe(window)}") from None
    if not start <= end:
        raise InputError(f"window must have start <= end, got {describe(window)}")
    by_name = _by_name(results)
    names = [r.name for r in rules]
    if len(set(names)) != len(names) or not all(isinstance(r, Rule) for r in rules):
        raise InputError(f"rules must be Rule objects with unique names, got {describe(names)}")
    span, at = (iso(start), iso(end)), iso(end)
    events = []
    for rule in rules:
        res = by_name.get(rule.detector)
        if res is None:
            continue
        key = fingerprint(rule.name, version)
        active = state.firing.get(key)
        if res.drifted and active is None:
            status, since = "firing", at
        elif not res.drifted and active is not None:
            status, since = "resolved", active.since
        else:
            continue
        cmp = "<" if status == "firing" else ">="  # a resolved alert's p-value is back at or above alpha
        what = f"p = {res.p_value:.3g} {cmp} {res.threshold}" if res.p_value is not None else \
            f"statistic {res.statistic:.4g} vs {res.threshold}"
        verb = "drift detected" if status == "firing" else "back within bounds"
        events.append(Alert(rule.name, status, rule.detector, version, float(res.statistic), res.threshold,
                            res.p_value, span, rule.severity, at, since, key,
                            f"{rule.name} ({rule.detector}) on version {version}: {verb} ({what}, n = {res.n})",
                            {"n": res.n}))
    return events


def _by_name(results: Any) -> dict[str, DetectorResult]:
    items = list(results.values()) if isinstance(results, Mapping) else list(results)
    if not all(isinstance(r, DetectorResult) for r in items):
        raise InputError(f"results must be DetectorResult objects, got {describe([type(r).__name__ for r in items])}")
    return {r.detector: r for r in items}


def default_rules() -> list[Rule]:
    """One rule per calibrated default detector (the brief's fixed rules are not alerted on by default:
    their false-alarm rates are far above 1 %; docs/monitoring.md has the figures)."""
    return [
        Rule("latent_ks", "ks_latent", "warning", "posterior means differ from the reference (KS, Bonferroni)"),
        Rule("aggregate_posterior", "moments", "warning", "q(z) mean/variance moved from the reference"),
        Rule("latent_mmd", "mmd_latent", "warning", "posterior means differ from the reference (MMD^2)"),
        Rule("recon_error_p99", "recon_p99", "critical", "more requests than expected above the reference p99"),
        Rule("latent_norm", "latent_norm", "warning", "more latent norms above 5 than the reference"),
        Rule("rolling_means", "rolling_mean", "warning", "5-minute mean of recon error / KL / norm beyond 3 sigma"),
        Rule("input_stats", "input_stats", "info", "pixel mean/variance distribution changed (data drift)"),
        Rule("gate_rejections", "gate_rejections", "warning",
             "more than 1 % of the window's images refused by the data-quality gate (binomial test vs 0.2 %)"),
    ]
