"""Model drift from generated samples: a scheduled FID job (``vaekit monitor fid``).

The drift detectors watch the requests; this job watches the model. On a schedule (or once, from
cron) :class:`FIDWatch` draws ``n_samples`` images from the version a registry reference names
(``mnist@production`` follows the alias, ``mnist/3`` pins a version), computes their FID on
vaekit's extractor (:mod:`vaekit.evaluation.fid`: LeNet features, against the dataset's test
split) and stores it with the time and the version in the record store (``monitor_fid``). When
the FID is above the calibrated threshold the ``fid_samples`` rule fires through the monitor's
alert path: :func:`~vaekit.monitoring.alerts.evaluate_rules` (one event per episode, resolved when
the FID is back), stored in ``monitor_alerts`` (route ``fid``) before the sinks see it.

The threshold (:func:`calibrate`). vaekit's FID units are not Inception's, so the brief's
"more than 5 points" becomes a rise over a baseline calibrated on the extractor, at the job's N:

    threshold = baseline + max(multiple * split_half, k_sigma * std * sqrt(1 + 1 / repeats))

* ``baseline``: the mean FID of ``repeats`` sample draws (different seeds) of the version served
  when the job was first calibrated (the baseline version);
* ``split_half``: the FID between two disjoint random N-image halves of the reference set (the
  test split), averaged over ``repeats`` splits: what resampling real data alone scores at this
  N, the estimator's noise floor; a rise smaller than a few of it is not a change the extractor
  can tell from resampling;
* ``std``: the standard deviation of the baseline draws; with ``k_sigma`` = 3 the term keeps a
  healthy version's false-alarm rate per check near 0.1 % (a normal tail), counting the baseline
  mean's own error (the ``sqrt(1 + 1 / repeats)``).

The calibration is stored (kind ``calibration``) and reused by every later check with the same N
and extractor, whichever version the reference names then: a worse version promoted later is
compared with the baseline, not with itself. ``recalibrate=True`` (``--calibrate``) sets a new one.
docs/monitoring.md has the figures measured on MNIST and how the defaults were set.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from vaekit.errors import ConfigError, InputError, describe
from vaekit.monitoring.alerts import Alert, AlertState, Rule, evaluate_rules, iso
from vaekit.monitoring.detectors import DetectorResult

log = logging.getLogger("vaekit.monitoring.fid_watch")

ROUTE = "fid"  # the route the job's alert events are stored under (they belong to no request route)
DEFAULT_MULTIPLE = 3.0  # times the split-half FID (docs/monitoring.md: how it was set)
DEFAULT_K_SIGMA = 3.0


def fid_rule() -> Rule:
    """The alert rule of the FID job (detector name ``fid``)."""
    return Rule("fid_samples", "fid", "warning", "FID of generated samples above the calibrated threshold")


@dataclass(frozen=True)
class FIDCalibration:
    """The threshold of the FID job at ``n_samples``: ``threshold = baseline + margin`` (FID units of the
    extractor whose weights hash is ``extractor``); ``draws`` are the baseline's per-seed FIDs."""

    version: str
    n_samples: int
    baseline: float
    std: float
    split_half: float
    multiple: float
    k_sigma: float
    threshold: float
    extractor: str
    draws: tuple[float, ...] = ()
    seeds: tuple[int, ...] = ()

    @property
    def margin(self) -> float:
        return self.threshold - self.baseline

    def to_doc(self) -> dict[str, Any]:
        return {"version": self.version, "n_samples": self.n_samples, "baseline": self.baseline, "std": self.std,
                "split_half": self.split_half, "multiple": self.multiple, "k_sigma": self.k_sigma,
                "threshold": self.threshold, "extractor": self.extractor, "draws": list(self.draws),
                "seeds": list(self.seeds)}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> FIDCalibration:
        return cls(str(doc["version"]), int(doc["n_samples"]), float(doc["baseline"]), float(doc["std"]),
                   float(doc["split_half"]), float(doc["multiple"]), float(doc["k_sigma"]), float(doc["threshold"]),
                   str(doc["extractor"]), tuple(doc.get("draws", ())), tuple(doc.get("seeds", ())))


@dataclass
class FIDCheck:
    """One check: the version checked, its FID of ``n_samples`` samples drawn with ``seed``, the
    calibration it was compared with, the result handed to the rules and the events they produced."""

    at: float
    version: str
    fid: float
    seed: int
    calibration: FIDCalibration
    result: DetectorResult
    events: list[Alert] = field(default_factory=list)
    sink_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"at": iso(self.at), "version": self.version, "fid": self.fid, "threshold": self.calibration.threshold,
                "drifted": self.result.drifted, "n_samples": self.calibration.n_samples, "seed": self.seed,
                "calibration": self.calibration.to_doc(), "events": [e.to_dict() for e in self.events],
                "sink_errors": list(self.sink_errors)}


def generate(model: Any, n: int, seed: int, batch: int = 1000) -> torch.Tensor:
    """``n`` samples (n, C, H, W) in [0, 1] drawn under a forked RNG seeded with ``seed`` (the caller's
    stream is untouched; the decoder's mean, as the evaluation's FID uses)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        return torch.cat([model.sample(min(batch, n - i)).clamp(0, 1).cpu() for i in range(0, n, batch)])


def samples_fid(model: Any, n: int, seed: int, dataset: str, extractor: Any, data: Any = None) -> float:
    """FID of ``n`` samples of ``model`` against ``dataset``'s test split on ``extractor``."""
    from vaekit.evaluation.fid import frechet_distance, image_stats, reference_stats

    mu, sigma = image_stats(generate(model, n, seed), extractor)
    return frechet_distance(mu, sigma, *reference_stats(dataset, "test", extractor, data=data))


def split_half_fid(dataset: str, n: int, extractor: Any, seed: int = 0, data: Any = None) -> float:
    """FID between two disjoint random ``n``-image halves of ``dataset``'s test split (n <= half of it):
    what two samples of the reference distribution itself score at N."""
    from vaekit.data import load_dataset
    from vaekit.data.dataset import to_unit_float
    from vaekit.evaluation.fid import feature_stats, frechet_distance

    ds = data if data is not None else load_dataset(dataset)
    total = len(ds.test)
    if not 2 <= n <= total // 2:
        raise InputError(f"n must be in [2, {total // 2}] (half of {dataset}'s test split), got {describe(n)}")
    pick = np.random.default_rng(seed).permutation(total)[: 2 * n]
    feats = extractor.features(to_unit_float(ds.test.images[torch.from_numpy(pick)]))  # (2n, F)
    return frechet_distance(*feature_stats(feats[:n]), *feature_stats(feats[n:]))


def calibrate(model: Any, version: str, n_samples: int, dataset: str, extractor: Any, *,
              multiple: float = DEFAULT_MULTIPLE, k_sigma: float = DEFAULT_K_SIGMA, repeats: int = 3,
              seed: int = 0, data: Any = None) -> FIDCalibration:
    """The threshold at ``n_samples`` (module docstring): ``repeats`` FIDs of the baseline ``version``
    (seeds ``seed``, ``seed + 1``, ...), their mean and standard deviation, and the split-half FID averaged
    over ``repeats`` random splits (the same seeds; one split alone varies by a third at N = 2,000)."""
    for name, v in (("multiple", multiple), ("k_sigma", k_sigma)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0 or not math.isfinite(v):
            raise ConfigError(f"{name} must be a finite number >= 0, got {describe(v)}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 2:
        raise ConfigError(f"repeats must be an integer >= 2 (a standard deviation needs two draws), got "
                          f"{describe(repeats)}")
    seeds = tuple(seed + i for i in range(repeats))
    draws = tuple(samples_fid(model, n_samples, s, dataset, extractor, data) for s in seeds)
    baseline, std = float(np.mean(draws)), float(np.std(draws, ddof=1))
    half = float(np.mean([split_half_fid(dataset, n_samples, extractor, seed=s, data=data) for s in seeds]))
    margin = max(multiple * half, k_sigma * std * math.sqrt(1 + 1 / repeats))
    return FIDCalibration(str(version), n_samples, baseline, std, half, float(multiple), float(k_sigma),
                          baseline + margin, extractor.weights_hash(), draws, seeds)


class FIDWatch:
    """The scheduled FID job for one registered model (see the module docstring).

    ``store``: a RecordStore or its URI; ``registry``: a ModelRegistry or its URI; ``ref``: the
    version to check, ``name@alias`` (followed at each check) or ``name/N``; ``n_samples``: images per
    FID (at most half the test split, for the split-half FID); ``dataset``: the extractor's dataset
    (default: the version's training data, else the model name); ``extractor``: a FeatureExtractor
    (default: ``load_extractor(dataset)``); ``sinks``: objects with ``emit(alerts)``, as the
    monitor's; ``data``: an ImageDataset already in memory (tests). ``multiple``, ``k_sigma``,
    ``repeats``: the calibration's (:func:`calibrate`).
    """

    def __init__(self, store: Any, registry: Any, ref: str, *, n_samples: int = 2000, dataset: str | None = None,
                 extractor: Any = None, sinks: Any = (), multiple: float = DEFAULT_MULTIPLE,
                 k_sigma: float = DEFAULT_K_SIGMA, repeats: int = 3, data: Any = None):
        from vaekit.monitoring.store import RecordStore
        from vaekit.registry import ModelRegistry
        from vaekit.registry.refs import parse_ref

        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
            raise ConfigError(f"n_samples must be an integer >= 2, got {describe(n_samples)}")
        for s in sinks:
            if not callable(getattr(s, "emit", None)):
                raise InputError(f"every sink needs an emit(alerts) method, got {type(s).__name__}")
        self.ref, self.model = ref, parse_ref(ref).name
        self._own = (isinstance(store, str), isinstance(registry, str))
        self.store = RecordStore(store) if isinstance(store, str) else store
        self.registry = ModelRegistry(registry) if isinstance(registry, str) else registry
        self.n_samples, self.sinks, self.data = n_samples, list(sinks), data
        self.multiple, self.k_sigma, self.repeats = multiple, k_sigma, repeats
        self._dataset, self._extractor = dataset, extractor
        self.checks = 0

    def close(self) -> None:
        if self._own[0]:
            self.store.close()
        if self._own[1]:
            self.registry.close()

    def __enter__(self) -> FIDWatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _resolve(self) -> tuple[str, Any, str, Any]:
        """(version, model, dataset, extractor) of what ``ref`` names now."""
        from vaekit.evaluation.extractor import load_extractor

        v = self.registry.get(self.ref)
        dataset = self._dataset or (v.data or {}).get("dataset") or self.model
        if self._extractor is None:
            self._extractor = load_extractor(dataset)
        return str(v.version), self.registry.load(v.ref).eval(), dataset, self._extractor

    def calibration(self, model: Any = None, version: str | None = None, dataset: str | None = None,
                    recalibrate: bool = False) -> FIDCalibration:
        """The stored calibration for this N and extractor (the latest), or a new one on the version
        ``ref`` names now (also when ``recalibrate``), stored before it is returned."""
        if model is None:
            version, model, dataset, _ = self._resolve()
        ext = self._extractor
        if not recalibrate:
            for row in reversed(self.store.fid_rows(self.model, "calibration", self.n_samples)):
                if row["doc"].get("extractor") == ext.weights_hash():
                    return FIDCalibration.from_doc(row["doc"])
        cal = calibrate(model, str(version), self.n_samples, str(dataset), ext, multiple=self.multiple,
                        k_sigma=self.k_sigma, repeats=self.repeats, data=self.data)
        self.store.append_fid(self.model, {"at": time.time(), "version": cal.version, "kind": "calibration",
                                           "n_samples": cal.n_samples, "fid": cal.baseline,
                                           "threshold": cal.threshold, "drifted": False, "doc": cal.to_doc()})
        log.info("fid: calibrated %s at N = %d on version %s: baseline %.3f (std %.3f), split-half %.3f, "
                 "threshold %.3f", self.model, cal.n_samples, cal.version, cal.baseline, cal.std, cal.split_half,
                 cal.threshold)
        return cal

    def run_once(self, now: float | None = None, seed: int | None = None, recalibrate: bool = False) -> FIDCheck:
        """One check: FID of fresh samples (``seed``: default from the clock) vs the calibrated threshold;
        the value is stored, the rule evaluated, the events stored and then handed to the sinks."""
        from vaekit.monitoring.monitor import rebuild_state

        at = time.time() if now is None else float(now)
        version, model, dataset, ext = self._resolve()
        cal = self.calibration(model, version, dataset, recalibrate=recalibrate)
        seed = int(at * 1000) % (2**31) if seed is None else int(seed)
        value = samples_fid(model, self.n_samples, seed, dataset, ext, self.data)
        drifted = value > cal.threshold
        result = DetectorResult("fid", value, drifted, cal.threshold, None, self.n_samples,
                                {"statistic": f"FID of {self.n_samples} samples (vaekit extractor {cal.extractor})",
                                 "baseline": cal.baseline, "baseline_version": cal.version, "seed": seed})
        self.store.append_fid(self.model, {"at": at, "version": version, "kind": "check", "n_samples": self.n_samples,
                                           "fid": value, "threshold": cal.threshold, "drifted": drifted,
                                           "doc": {"seed": seed, "dataset": dataset, "calibration": cal.to_doc()}})
        state = rebuild_state(self.store.alert_events(self.model, limit=10**9)).get(ROUTE, AlertState())
        events = evaluate_rules([fid_rule()], [result], state, version=version, window=(at, at))
        check = FIDCheck(at, version, value, seed, cal, result, events)
        if events:
            self.store.append_alerts([{**e.to_dict(), "route": ROUTE} for e in events], self.model)
        self._emit(check)
        self.checks += 1
        log.info("fid: %s version %s: FID %.3f (threshold %.3f)%s", self.model, version, value, cal.threshold,
                 " DRIFT" if drifted else "")
        return check

    def _emit(self, check: FIDCheck) -> None:
        """Hand the events (fingerprint ``rule@version/fid``) and the result to the sinks; a failing sink is
        logged and reported in ``check.sink_errors`` (the events are stored already)."""
        routed = [replace(e, fingerprint=f"{e.fingerprint}/{ROUTE}", message=f"{self.model} {e.message} [FID job]")
                  for e in check.events]
        for sink in self.sinks:
            try:
                if callable(getattr(sink, "observe", None)):
                    sink.observe({"fid": check.result}, check.version)
                if routed:
                    sink.emit(routed)
            except Exception as exc:  # a sink down must not stop the job
                msg = f"{type(sink).__name__}: {type(exc).__name__}: {exc}"
                check.sink_errors.append(msg)
                log.error("fid: sink failed: %s", msg)

    def run(self, interval_s: float = 3600.0, iterations: int | None = None, stop: Any = None) -> list[FIDCheck]:
        """A check every ``interval_s`` seconds, ``iterations`` times (None: until ``stop``, a
        threading.Event, is set); a check that fails on a database error is logged and retried at the next
        one; a vaekit error (no extractor, an unknown reference) is raised. Returns the checks done when
        ``iterations`` is given."""
        if isinstance(interval_s, bool) or not isinstance(interval_s, int | float) or not interval_s > 0:
            raise ConfigError(f"interval_s must be a number > 0, got {describe(interval_s)}")
        from vaekit.monitoring.monitor import run_every

        return run_every(self.run_once, interval_s, iterations, stop, "fid: check")
