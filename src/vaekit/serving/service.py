"""ModelService: the transport-free inference service (MLServer's DataPlane; no HTTP in here).

    service = ModelService("runs/mnist/model", max_batch_size=16, max_wait_ms=2)
    service.start()                                   # load, warm up, start the batcher
    result = service.score(x)                         # x (B, C, H, W) floats in [0, 1]
    result.version, result.stats.recon_nats           # (B,) nats, from the same forward pass

Every call (``encode``, ``decode``, ``reconstruct``, ``generate``, ``score``) returns a
:class:`Result` naming the version that served it, the outputs, and per image the monitoring
stats of that same pass (``model.inspect``): per-pixel MSE and nats of the reconstruction, KL
(families that define an ELBO), the posterior mean and its norm, VQ-VAE codes, and the verdicts
against the reference profile. Concurrent calls go through one :class:`MicroBatcher`; a swap to
a new version (``reload``) loads and warms the new model in the background and replaces a single
reference, so a batch that has started finishes on the version it started with.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vaekit.errors import ConfigError, InputError, check_positive, describe
from vaekit.models import BaseModel
from vaekit.models.base import check_class_labels
from vaekit.serving.batching import Job, MicroBatcher
from vaekit.serving.records import RecordDispatcher, RecordSink, RequestRecord, TeeSink
from vaekit.serving.sources import Loaded, ModelSource, resolve_source

log = logging.getLogger("vaekit.serving")

ENDPOINTS = ("encode", "decode", "reconstruct", "generate", "score")
ROUTES = ("production", "canary", "shadow")
DEFAULT_STORE = "sqlite:///monitoring/records.db"  # beside the default registry (registry/registry.db)


class GateRejectedError(InputError):
    """The data-quality gate refused an image of the request (the HTTP app answers 422 with ``reasons``).

    ``reasons`` has one entry per image of the request: None for an image that passed, else the
    failed check (``vaekit.monitoring.gate.REASONS``)."""

    def __init__(self, message: str, reasons: list[str | None]):
        super().__init__(message)
        self.reasons = reasons
INSPECTING = ("encode", "reconstruct", "score")  # endpoints that run model.inspect on x


class RequestIds:
    """Request ids of 16 hex digits: 8 random per process, then a counter.

    Unique within a process (for 2**32 requests) and, with a random prefix of 32 bits, across the
    few service processes that share a store. ``secrets.token_hex`` costs a getrandom system call
    per request (3 % of a batch-1 request's CPU); canary, shadow and capture choices hash the id
    (keyed BLAKE2b), so they need it unique, not unpredictable. A forked child draws a new prefix."""

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count) & 0xFFFFFFFF:08x}"  # next() on a count is atomic


new_request_id = RequestIds()


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU; otherwise ``device`` as given (checked)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {describe(device)}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device is {device!r} but CUDA is not available here; use --device cpu or auto")
    return dev


def profile_thresholds(profile: Any) -> dict[str, float]:
    """The p99 thresholds a verdict compares against, from a reference profile's ``quantiles``
    (``recon_nll`` nats, ``recon_mse``); empty when there is no profile."""
    if profile is None:
        return {}
    q = getattr(profile, "quantiles", None) or {}
    out = {}
    for src, dst in (("recon_nll", "recon_nats_p99"), ("recon_mse", "recon_mse_p99")):
        v = (q.get(src) or {}).get("p99")
        if isinstance(v, int | float) and math.isfinite(v):
            out[dst] = float(v)
    return out


@dataclass
class Deployment:
    """One loaded, warmed-up model version."""

    name: str
    version: str
    model: BaseModel
    profile: Any
    thresholds: dict[str, float]
    loaded_at: float
    warmup_ms: float
    gate: Any = None  # vaekit.monitoring.gate.QualityGate, None when the gate is off
    gate_info: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.model.family

    def describe(self) -> dict[str, Any]:
        m, c = self.model, self.model.config
        info: dict[str, Any] = {
            "name": self.name, "version": self.version, "family": m.family, "input_shape": list(m.input_shape),
            "latent_dim": int(c.latent_dim), "likelihood": c.likelihood, "capabilities": m.capabilities(),
            "device": str(m.device), "loaded_at": self.loaded_at, "warmup_ms": round(self.warmup_ms, 3),
            "profile": {"available": self.profile is not None, **self.thresholds},
            "gate": self.gate_info,
        }
        if m.conditional:
            info["condition"] = {"kind": c.condition, "num_classes": c.num_classes if c.condition == "class" else None,
                                 "cond_dim": c.cond_size}
        if m.discrete_latent:
            info["code_grid"] = list(c.grid)
            info["codebook_size"] = int(c.codebook_size)
        return info


@dataclass
class Stats:
    """Per-image monitoring figures of one pass, CPU tensors with B rows; None where the family or
    endpoint has no such figure. Verdicts are bool tensors; ``recon_above_p99`` is None without a profile."""

    recon_mse: torch.Tensor | None = None  # (B,) per-pixel MSE, squared intensity
    recon_nats: torch.Tensor | None = None  # (B,) -log p(x|z = posterior mean), nats
    kl: torch.Tensor | None = None  # (B,) nats, families that define an ELBO
    latent_norm: torch.Tensor | None = None  # (B,)
    latent: torch.Tensor | None = None  # (B, D) posterior mean
    logvar: torch.Tensor | None = None  # (B, D)
    codes: torch.Tensor | None = None  # (B, h, w) int64
    recon_above_p99: torch.Tensor | None = None  # (B,) bool
    latent_norm_above_limit: torch.Tensor | None = None  # (B,) bool

    def rows(self, lo: int, hi: int) -> Stats:
        return Stats(**{k: (v[lo:hi] if v is not None else None) for k, v in self.__dict__.items()})

    def image(self, i: int) -> dict[str, Any]:
        """Image ``i``'s figures as plain Python data (what the HTTP response and records carry)."""
        return self.images()[i]

    def images(self) -> list[dict[str, Any]]:
        """Every image's figures as plain Python data (one ``tolist`` per tensor, not per value)."""
        n = next((int(t.shape[0]) for t in self.__dict__.values() if t is not None), 0)
        none = [None] * n

        def col(t):
            return none if t is None else t.tolist()

        mse, nats, kl, norm = col(self.recon_mse), col(self.recon_nats), col(self.kl), col(self.latent_norm)
        above, limit = col(self.recon_above_p99), col(self.latent_norm_above_limit)
        return [{"recon_mse": mse[i], "recon_nats": nats[i], "kl": kl[i], "latent_norm": norm[i],
                 "verdicts": {"recon_above_p99": above[i], "latent_norm_above_limit": limit[i]}} for i in range(n)]


@dataclass
class Result:
    """What one call returns. ``outputs`` holds CPU tensors with one row per image of the request."""

    endpoint: str
    model: str
    version: str
    request_id: str
    outputs: dict[str, torch.Tensor]
    stats: Stats | None
    profile_available: bool
    batch_size: int  # images in the model call that served this request
    latency_s: float = 0.0
    seed: int | None = None  # generate: the seed used (given or drawn), so the call can be repeated
    arrived: float = 0.0  # Unix time the request was accepted
    route: str = "production"  # production | canary | shadow
    pixel_mean: np.ndarray | None = None  # (n,) per image, from the gate (None for decode / generate)
    pixel_var: np.ndarray | None = None

    @property
    def n(self) -> int:
        first = next(iter(self.outputs.values()), None)
        if first is not None:
            return int(first.shape[0])
        return int(self.stats.latent_norm.shape[0]) if self.stats and self.stats.latent_norm is not None else 0


@dataclass
class _Payload:
    endpoint: str
    x: torch.Tensor | None  # (n, C, H, W), or z for decode
    y: torch.Tensor | None
    request_id: str
    arrived: float  # time.time()
    seed: int | None = None
    n: int = 0
    route: str = "production"
    extra: dict[str, Any] = field(default_factory=dict)


class ModelService:
    """Loads a model from a source, warms it up and serves batched calls with per-image stats.

    Parameters: ``source`` a model folder, a registry reference (``name@alias``, ``name/3``; looked up
    in ``registry``, a ModelRegistry or URI) or any :class:`ModelSource`; ``device``
    ``auto``/``cpu``/``cuda``; ``max_batch_size`` images per model call (1 turns micro-batching off);
    ``max_wait_ms`` how long a batch may wait for company; ``latent_norm_limit``
    the posterior-mean norm above which an image is flagged (5: the product brief); ``max_images``
    per request; ``sink`` receives a :class:`RequestRecord` per served image (off the request path);
    ``poll_interval_s`` checks the source for a new version that often (None: only on ``reload()``);
    ``threads`` sets torch's intra-op threads on the worker (None: leave torch's default);
    ``observers`` are called after each batch, on the records thread (the metrics hook).

    Monitoring: ``gate`` runs the data-quality gate (:mod:`vaekit.monitoring.gate`) on every image
    before inference: a rejected image raises :class:`GateRejectedError` (HTTP 422), is recorded with
    ``accepted=False`` and its reason, and never reaches the model or the drift statistics.
    ``min_variance`` is its variance floor (0.01, the brief's); its histogram reference is the
    version's profile (``intensity_hist``), with ``hist_threshold`` (None: the profile's
    ``info["gate"]["hist_threshold"]`` when present, else ``gate.DEFAULT_HIST_THRESHOLD``).
    ``store`` (a URI or a :class:`vaekit.monitoring.store.RecordStore`) receives every record
    through the same background dispatcher as ``sink``; ``close()`` (SIGTERM/SIGINT in
    ``vaekit serve``) writes everything queued first. ``record_interval_s`` is how often the
    dispatcher writes (what a SIGKILL can lose; 10 ms: see RecordDispatcher); ``record_queue``
    its bound (items beyond are dropped, counted and logged).

    Routing (a registry source that follows an alias, e.g. ``name@production``): ``canary``
    and ``shadow`` are further sources, by default ``name@canary`` and ``name@shadow`` of the same
    registry, followed like the main one (an alias that does not exist, or is removed, means no
    canary / shadow). ``routing`` (a :class:`vaekit.deploy.routing.RoutingPolicy`) sends its
    ``canary_share`` of request keys (the request id, or the caller's client key) to the canary,
    and mirrors its ``shadow_share`` of requests to the shadow on a background thread behind a
    bounded queue (``shadow_queue``; drops counted in ``shadow_dropped``); the shadow's records
    carry ``route="shadow"`` and the request's id. Pass ``canary=False`` / ``shadow=False`` to
    turn either off. ``shadow_process=True`` runs the shadow's model in a child process that
    writes its records to ``store`` (a URI) itself (:mod:`vaekit.serving.shadow_process`): the
    service's thread then only hands it the inputs.

    Capture (:mod:`vaekit.serving.capture`): ``capture`` (a :class:`~vaekit.serving.capture.Capture`,
    or a folder: a Capture there indexed in ``store``, with ``capture_share`` (0.1) and
    ``capture_options``, further Capture keyword arguments) keeps the images of that share of the
    requests the gate accepted on the production route (encode, reconstruct, score), chosen by a
    hash of the request id, as shards; the work runs on the records thread and ``close()`` writes
    what is buffered.
    """

    def __init__(self, source: str | ModelSource, *, name: str | None = None, registry: Any = None,
                 device: str | torch.device = "auto",
                 max_batch_size: int = 16, max_wait_ms: float = 2.0, latent_norm_limit: float = 5.0,
                 max_images: int = 256, sink: RecordSink | None = None, poll_interval_s: float | None = None,
                 threads: int | None = None, warmup: bool = True, gate: bool = True, min_variance: float = 0.01,
                 hist_threshold: float | None = None, store: Any = None, record_interval_s: float = 0.01,
                 record_queue: int = 10_000, routing: Any = None, canary: Any = None, shadow: Any = None,
                 shadow_queue: int = 1024, capture: Any = None, capture_share: float = 0.1,
                 capture_options: dict[str, Any] | None = None, shadow_process: bool = False):
        check_positive("max_batch_size", max_batch_size, integer=True)
        check_positive("max_wait_ms", max_wait_ms, allow_zero=True)
        check_positive("latent_norm_limit", latent_norm_limit)
        check_positive("max_images", max_images, integer=True)
        if poll_interval_s is not None:
            check_positive("poll_interval_s", poll_interval_s)
        if threads is not None:
            check_positive("threads", threads, integer=True)
        check_positive("min_variance", min_variance, allow_zero=True)
        if hist_threshold is not None and (isinstance(hist_threshold, bool)
                                           or not isinstance(hist_threshold, int | float)
                                           or not 0 <= hist_threshold <= 1):
            raise ConfigError(f"hist_threshold must be a total-variation distance in [0, 1], got "
                              f"{describe(hist_threshold)}")
        check_positive("record_interval_s", record_interval_s)
        check_positive("record_queue", record_queue, integer=True)
        check_positive("shadow_queue", shadow_queue, integer=True)
        from vaekit.deploy.routing import RoutingPolicy

        if routing is None:
            routing = RoutingPolicy()
        if not isinstance(routing, RoutingPolicy):
            raise ConfigError(f"routing must be a vaekit.deploy.routing.RoutingPolicy, got {describe(routing)}")
        self.routing = routing
        self.gate_enabled, self.min_variance = bool(gate), float(min_variance)
        self.hist_threshold = None if hist_threshold is None else float(hist_threshold)
        self.record_interval_s, self.record_queue, self.shadow_queue = float(record_interval_s), record_queue, \
            shadow_queue
        self.source = resolve_source(source, name, registry)
        self.name = self.source.name
        self.device = pick_device(device)
        self.max_batch_size, self.max_wait_ms = max_batch_size, float(max_wait_ms)
        self.latent_norm_limit, self.max_images = float(latent_norm_limit), max_images
        self.poll_interval_s, self.threads, self.warmup = poll_interval_s, threads, warmup
        self.observers: list[Callable[[list[Result], int], None]] = []  # (results of a batch, images in it)
        self.swap_listeners: list[Callable[[str | None, str], None]] = []
        self._own_store = None
        if store is not None:
            if isinstance(store, str):
                from vaekit.monitoring.store import RecordStore

                store = self._own_store = RecordStore(store)
            if not callable(getattr(store, "write", None)):
                raise ConfigError(f"store must be a record-store URI or an object with write(records), got "
                                  f"{describe(store)}")
        self.store = store
        self.shadow_process = bool(shadow_process)
        self._shadow_proc: Any = None  # vaekit.serving.shadow_process.ShadowProcess, once started
        if self.shadow_process and not isinstance(getattr(store, "uri", None), str):
            raise ConfigError("shadow_process=True needs store= a record-store URI (the shadow process writes "
                              f"its records there itself), got store={describe(store)}")
        self.sink = TeeSink(sink, store) if sink is not None and store is not None else (sink or store)
        self.capture = self._make_capture(capture, capture_share, capture_options)
        self._post: RecordDispatcher | None = None  # observers + records, on one background thread
        # side routes: route -> source (None: that route is off); deployments live in self._sides
        self._side_sources: dict[str, ModelSource | None] = {
            "canary": self._side_source(canary, "canary", registry),
            "shadow": self._side_source(shadow, "shadow", registry)}
        self._sides: dict[str, Deployment | None] = {"canary": None, "shadow": None}
        self._shadow_q: deque[tuple[_Payload, float]] = deque()
        self._shadow_thread: threading.Thread | None = None
        self.shadow_dropped = 0
        self.shadow_errors = 0
        self.shadow_served = 0
        self._current: Deployment | None = None
        self._batcher: MicroBatcher | None = None
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.swaps = 0
        self.last_reload_error: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> ModelService:
        """Load and warm up the current version, start the batcher (and the poller). Idempotent."""
        if self._batcher is not None:
            return self
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self._current = self._load()
        self._reload_sides()  # a canary / shadow that fails to load is logged; production serves regardless
        self._post = RecordDispatcher(self.sink if self.sink is not None else _NullSink(), max_queue=self.record_queue,
                                      interval_s=self.record_interval_s)
        if self._side_sources["shadow"] is not None:
            if self.shadow_process:
                from vaekit.serving.shadow_process import ShadowProcess, source_spec

                self._shadow_proc = ShadowProcess(
                    shadow_child_main, source_spec(self._side_sources["shadow"]), self.store.uri,
                    device=str(self.device), threads=self.threads, poll_interval_s=self.poll_interval_s,
                    latent_norm_limit=self.latent_norm_limit)
            self._shadow_thread = threading.Thread(target=self._shadow_loop, name="vaekit-shadow", daemon=True)
            self._shadow_thread.start()
        self._batcher = MicroBatcher(self._run_batch, self.max_batch_size, self.max_wait_ms,
                                     init=(lambda: torch.set_num_threads(self.threads)) if self.threads else None)
        if self.poll_interval_s is not None:
            self._poller = threading.Thread(target=self._poll, name="vaekit-poller", daemon=True)
            self._poller.start()
        return self

    def close(self) -> None:
        """Finish queued work, flush records, stop threads."""
        self._stop.set()
        if self._batcher is not None:
            self._batcher.close()
        if self._shadow_thread is not None:
            self._shadow_thread.join(10)
        if self._shadow_proc is not None:  # before the store closes: the child writes what it was sent
            self._shadow_proc.close()
        if self._post is not None:
            self._post.close()
        if self.capture is not None:  # after the dispatcher: its last batches may still offer images
            self.capture.close()
        if self._own_store is not None:
            self._own_store.close()

    def __enter__(self) -> ModelService:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def ready(self) -> bool:
        """True once a version is loaded and warmed up."""
        return self._current is not None and self._batcher is not None

    @property
    def deployment(self) -> Deployment:
        if self._current is None:
            raise RuntimeError("the service is not started: call start()")
        return self._current

    @property
    def version(self) -> str:
        return self.deployment.version

    @property
    def queue_depth(self) -> int:
        return self._batcher.depth if self._batcher is not None else 0

    @property
    def records_dropped(self) -> int:
        return self._post.dropped if self._post is not None else 0

    @property
    def records_written(self) -> int:
        return self._post.written if self._post is not None else 0

    def flush_records(self) -> None:
        """Write every queued record now (tests; ``close`` does it too)."""
        if self._post is not None:
            self._post.flush()

    def flush_capture(self) -> None:
        """Hand every queued batch to the capture, then write its buffer as a shard (tests, a replay
        that wants a shard boundary at a given time; ``close`` does it too)."""
        self.flush_records()
        if self.capture is not None:
            self.capture.flush()

    def _make_capture(self, capture: Any, share: float, options: dict[str, Any] | None) -> Any:
        """The Capture for the ``capture`` argument (see the class docstring); None when it is None."""
        if capture is None:
            return None
        from vaekit.serving.capture import Capture

        if isinstance(capture, Capture):
            return capture
        if not isinstance(capture, str | os.PathLike):
            raise ConfigError(f"capture must be a folder or a vaekit.serving.capture.Capture, got {describe(capture)}")
        if self.store is None:
            raise ConfigError(f"capture={str(capture)!r} needs a record store (store=URI): the capture index and its "
                              "retention live there")
        return Capture(capture, self.store, share=share, **(options or {}))

    @property
    def canary(self) -> Deployment | None:
        """The canary deployment, None when no canary is set."""
        return self._sides["canary"]

    @property
    def shadow(self) -> Deployment | None:
        """The shadow deployment, None when no shadow is set."""
        return self._sides["shadow"]

    def _side_source(self, given: Any, route: str, registry: Any) -> ModelSource | None:
        """The source of a side route: ``given`` (a source or reference), False (off), or, for a
        registry source that follows an alias, ``name@<route>`` in the same registry."""
        if given is False:
            return None
        if given is not None and given is not True:
            if isinstance(given, ModelSource):
                return given
            from vaekit.serving.sources import RegistrySource

            return RegistrySource(str(given), getattr(self.source, "registry", registry), self.name)
        from vaekit.serving.sources import RegistrySource

        src = self.source
        if isinstance(src, RegistrySource) and src.ref.alias is not None and src.ref.alias != route:
            return RegistrySource(f"{src.ref.name}@{route}", src.registry, self.name)
        return None

    def _reload_side(self, route: str) -> bool:
        """Follow a side route's source: load a new version, or drop the route when its alias is gone.
        Returns True when the route changed."""
        from vaekit.errors import RegistryLookupError

        src = self._side_sources[route]
        if src is None:
            return False
        current = self._sides[route]
        try:
            version = src.current_version()
        except RegistryLookupError:
            version = None
        if version is None:
            if current is not None:
                self._sides[route] = None
                log.info("%s: %s %s removed", self.name, route, current.version)
                return True
            return False
        if current is not None and current.version == version:
            return False
        new = self._load(src)
        self._sides[route] = new
        log.info("%s: %s now %s (was %s)", self.name, route, new.version, current.version if current else None)
        if route == "shadow" and self._shadow_proc is not None:
            self._shadow_proc.reload()
        return True

    # -- loading and swapping ----------------------------------------------------------------------
    def _load(self, source: ModelSource | None = None) -> Deployment:
        t0 = time.perf_counter()
        loaded: Loaded = (source or self.source).load(self.device)
        model = loaded.model.eval()
        warm = time.perf_counter()
        if self.warmup:
            self._warm_up(model)
        now = time.perf_counter()
        log.info("loaded %s version %s in %.0f ms (warm-up %.0f ms)", self.name, loaded.version,
                 (now - t0) * 1e3, (now - warm) * 1e3)
        gate, gate_info = self._make_gate(model, loaded.profile)
        return Deployment(self.name, loaded.version, model, loaded.profile, profile_thresholds(loaded.profile),
                          time.time(), (now - warm) * 1e3, gate, gate_info)

    def _make_gate(self, model: BaseModel, profile: Any) -> tuple[Any, dict[str, Any]]:
        """The data-quality gate of one version: shape, NaN/inf, range, variance, and the histogram
        check against the profile's ``intensity_hist`` when the profile has one."""
        if not self.gate_enabled:
            return None, {"enabled": False}
        from vaekit.monitoring.gate import DEFAULT_HIST_THRESHOLD, QualityGate

        gate = QualityGate(tuple(model.input_shape), min_variance=self.min_variance, histogram=False)
        info: dict[str, Any] = {"enabled": True, "min_variance": self.min_variance, "histogram": False}
        arrays = getattr(profile, "arrays", None) or {}
        hist = arrays.get("intensity_hist")
        if hist is None:
            info["histogram_off"] = "no reference profile with an intensity histogram"
            return gate, info
        stored = ((getattr(profile, "info", None) or {}).get("gate") or {}).get("hist_threshold")
        if self.hist_threshold is not None:
            thr, where = self.hist_threshold, "option"
        elif isinstance(stored, int | float) and 0 <= stored <= 1:
            thr, where = float(stored), "profile"
        else:
            thr, where = DEFAULT_HIST_THRESHOLD, "default (the profile has no calibrated threshold)"
        try:
            gate.fit_from(hist.double(), thr)
        except InputError as exc:  # a histogram that does not fit the gate: keep the other checks
            info["histogram_off"] = str(exc)
            return gate, info
        gate.histogram = True
        info.update(histogram=True, hist_threshold=thr, hist_threshold_source=where)
        return gate, info

    def _warm_up(self, model: BaseModel) -> None:
        """Run the serving pass at the batch sizes it will see, so the first request pays no
        allocator growth or kernel selection (and CUDA's lazy init happens here)."""
        y_for = _example_condition(model)
        with torch.inference_mode():
            for b in sorted({1, min(self.max_batch_size, 8), self.max_batch_size}, reverse=True):  # batch 1 last
                x = torch.full((b, *model.input_shape), 0.5, device=model.device, dtype=model.dtype)
                for _ in range(2):
                    model.inspect(x, y_for(b))
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)

    def reload(self, wait: bool = True) -> dict[str, Any]:
        """Ask the source for its current version; when it differs from the one serving, load and
        warm up the new one (in this thread when ``wait``, else in a background thread) and swap.
        Returns ``{"previous", "current", "changed"}`` (``current`` is the new version once swapped)."""
        if not wait:
            threading.Thread(target=self._reload_safely, name="vaekit-reload", daemon=True).start()
            return {"previous": self.version, "current": self.version, "changed": False, "pending": True}
        out = self._reload_once()
        self._reload_sides()
        return out

    def _reload_safely(self) -> None:
        try:
            self._reload_once()
        except Exception as exc:  # keep serving the old version; say why in /readyz and the log
            self.last_reload_error = f"{type(exc).__name__}: {exc}"
            log.exception("reload of %s failed; still serving %s", self.name, self.version)
        self._reload_sides()

    def _reload_sides(self) -> None:
        for route in self._sides:
            try:
                self._reload_side(route)
            except Exception as exc:  # a canary / shadow that fails to load leaves the route as it was
                self.last_reload_error = f"{route}: {type(exc).__name__}: {exc}"
                log.exception("reload of %s's %s failed", self.name, route)

    def _reload_once(self) -> dict[str, Any]:
        with self._reload_lock:
            previous = self.version
            if self.source.current_version() == previous:
                return {"previous": previous, "current": previous, "changed": False}
            new = self._load()
            if new.version == previous:
                return {"previous": previous, "current": previous, "changed": False}
            self._current = new  # one reference assignment: a running batch keeps its own snapshot
            self.swaps += 1
            self.last_reload_error = None
            log.info("%s: swapped version %s -> %s", self.name, previous, new.version)
            for fn in self.swap_listeners:
                fn(previous, new.version)
            return {"previous": previous, "current": new.version, "changed": True}

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            self._reload_safely()

    # -- public calls (blocking); submit() is the non-blocking form ----------------------------------
    def score(self, x: Any, y: Any = None, request_id: str | None = None) -> Result:
        """Per-image monitoring stats of x (B, C, H, W) in [0, 1] (no image outputs)."""
        return self.submit("score", x=x, y=y, request_id=request_id).result()

    def encode(self, x: Any, y: Any = None, request_id: str | None = None) -> Result:
        """Posterior mean (B, D) and log-variance, or VQ-VAE codes (B, h, w); plus the stats."""
        return self.submit("encode", x=x, y=y, request_id=request_id).result()

    def reconstruct(self, x: Any, y: Any = None, request_id: str | None = None) -> Result:
        """Decoder mean at the posterior mean (B, C, H, W); plus the stats."""
        return self.submit("reconstruct", x=x, y=y, request_id=request_id).result()

    def decode(self, z: Any, y: Any = None, request_id: str | None = None) -> Result:
        """Decoder mean of latents z (B, D) (VQ-VAE: code indices (B, h, w) int64)."""
        return self.submit("decode", x=z, y=y, request_id=request_id).result()

    def generate(self, n: int, y: Any = None, seed: int | None = None, request_id: str | None = None) -> Result:
        """``n`` samples (n, C, H, W); the same ``seed`` gives the same images whatever else runs."""
        return self.submit("generate", n=n, y=y, seed=seed, request_id=request_id).result()

    def submit(self, endpoint: str, *, x: Any = None, y: Any = None, n: int | None = None, seed: int | None = None,
               request_id: str | None = None, alone: bool = False, client_key: str | None = None) -> Future:
        """Validate the request now (InputError raised here, in the caller's thread) and queue it;
        the future resolves to a :class:`Result` (or raises InputError for a fault found later).

        ``alone``: the caller knows no other request is in flight; when the worker is idle the job
        then runs in this thread at once (the future is already done on return). ``client_key``
        (else the request id) decides production vs canary while a canary is set."""
        if self._batcher is None:
            raise RuntimeError("the service is not started: call start()")
        rid = request_id or new_request_id()
        route = "production"
        if self._sides["canary"] is not None and self.routing.route(client_key or rid) == "canary":
            route = "canary"
        payload = self.prepare(endpoint, x=x, y=y, n=n, seed=seed, request_id=rid, route=route)
        key = None if endpoint == "generate" else (route, endpoint, None if payload.y is None else payload.y.dtype,
                                                   payload.x.dtype)
        job = Job(key, payload.n, payload)
        if endpoint in INSPECTING and self._sides["shadow"] is not None and self.routing.mirror(rid):
            self._mirror(payload)
        if alone and self._batcher.try_inline(job):
            return job.future
        return self._batcher.submit(job)

    def _deployment_for(self, route: str) -> Deployment:
        dep = self._sides.get(route) if route != "production" else None
        return dep if dep is not None else self.deployment

    def prepare(self, endpoint: str, *, x: Any = None, y: Any = None, n: int | None = None, seed: int | None = None,
                request_id: str | None = None, route: str = "production") -> _Payload:
        """Check one request against the model of ``route``; InputError names what is wrong
        (:class:`GateRejectedError` when the data-quality gate refused an image: it is recorded)."""
        if endpoint not in ENDPOINTS:
            raise InputError(f"endpoint must be one of {list(ENDPOINTS)}, got {describe(endpoint)}")
        dep = self._deployment_for(route)
        model = dep.model
        rid = request_id or new_request_id()
        if endpoint == "generate":
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_images:
                raise InputError(f"n must be an integer in [1, {self.max_images}], got {describe(n)}")
            if seed is None:
                seed = secrets.randbits(63)
            elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
                raise InputError(f"seed must be an integer in [0, 2**63), got {describe(seed)}")
            return _Payload(endpoint, None, self._check_y(model, y, n, optional=True), rid, time.time(), seed, n,
                            route=route)
        extra: dict[str, Any] = {}
        if endpoint == "decode":
            z = self._check_latent(model, x)
            batch = z.shape[0]
        else:
            x = _as_tensor(x, "x")
            if x.ndim >= 1 and x.shape[0] > self.max_images:
                raise InputError(f"x holds {x.shape[0]} images; at most {self.max_images} per request are allowed")
            values_checked = False
            if dep.gate is not None and x.is_floating_point() and x.ndim == 4 and x.shape[0] > 0:
                verdict = dep.gate.check(x)
                if not verdict.accepted.all():
                    self._rejected(dep, endpoint, rid, route, verdict)
                    raise self._rejection(model, x, verdict)
                extra = {"pixel_mean": verdict.pixel_mean, "pixel_var": verdict.pixel_var}
                low, high = dep.gate.value_range
                values_checked = low >= 0.0 and high <= 1.0  # finite and within the model's [0, 1]
            # the values are checked once per request (here or by the gate); inspect skips them
            z = model.check_input(x, "x", values=not values_checked)
            batch = z.shape[0]
        if batch > self.max_images:
            raise InputError(f"{'z' if endpoint == 'decode' else 'x'} holds {batch} images; at most "
                             f"{self.max_images} per request are allowed")
        return _Payload(endpoint, z, self._check_y(model, y, batch), rid, time.time(), None, batch, route=route,
                        extra=extra)

    def _rejection(self, model: BaseModel, x: torch.Tensor, verdict: Any) -> GateRejectedError:
        """The error for a refused request: the model's own message for shape / NaN / range faults
        (it names the fix), else which images failed which check."""
        reasons = list(verdict.reasons)
        try:
            model.check_input(x, "x")
            message = None
        except InputError as exc:
            message = str(exc)
        if message is None:
            bad = [(i, r) for i, r in enumerate(reasons) if r is not None]
            what = {"low_variance": f"pixel variance below {self.min_variance} (a blank or constant image)",
                    "histogram": "intensity histogram too far from the reference profile's"}
            first_i, first_r = bad[0]
            message = (f"x: {len(bad)} of {len(reasons)} images rejected by the data-quality gate; image {first_i}: "
                       f"{first_r} ({what.get(first_r, first_r)})")
        return GateRejectedError(message, reasons)

    def _rejected(self, dep: Deployment, endpoint: str, rid: str, route: str, verdict: Any) -> None:
        """Record every image of a refused request (accepted=False; the images that passed the gate
        carry reason ``request_rejected``: they were refused with their request)."""
        if self._post is None or self.sink is None:
            return
        now = time.time()
        means, vars_ = verdict.pixel_mean.tolist(), verdict.pixel_var.tolist()
        recs = [RequestRecord(time=now, request_id=rid, model=self.name, version=dep.version, endpoint=endpoint,
                              latency_s=0.0, route=route, accepted=False, reason=r or "request_rejected",
                              pixel_mean=_finite_or_none(means[i]), pixel_var=_finite_or_none(vars_[i]), index=i,
                              batch_size=0)
                for i, r in enumerate(verdict.reasons)]
        self._post.submit(recs)

    def _check_y(self, model: BaseModel, y: Any, n: int, optional: bool = False) -> torch.Tensor | None:
        if not model.conditional:
            if y is not None:
                raise InputError(f"y must be omitted: model {self.name} ({model.family}) is not conditional, "
                                 f"got {describe(_short(y))}")
            return None
        c = model.config
        if y is None:
            if optional:
                return None
            want = f"class labels ({n},) in [0, {c.num_classes})" if c.condition == "class" else \
                f"condition vectors ({n}, {c.cond_size})"
            raise InputError(f"y is required: model {self.name} is conditional and needs {want}")
        y = _as_tensor(y, "y")
        if c.condition == "class":
            if y.is_floating_point():
                raise InputError(f"y must hold integer class labels in [0, {c.num_classes}), got dtype {y.dtype}")
            return check_class_labels(y, c.num_classes, n, what="y")
        if not y.is_floating_point() or y.ndim != 2 or tuple(y.shape) != (n, c.cond_size):
            raise InputError(f"y must be float condition vectors of shape ({n}, {c.cond_size}), "
                             f"got dtype {y.dtype} shape {tuple(y.shape)}")
        if not bool(torch.isfinite(y).all()):
            raise InputError("y holds NaN or inf values; condition vectors must be finite")
        return y.to(model.dtype)

    def _check_latent(self, model: BaseModel, z: Any) -> torch.Tensor:
        z = _as_tensor(z, "z")
        if model.discrete_latent:
            h, w = model.config.grid
            K = model.config.codebook_size
            if z.is_floating_point() or z.dtype == torch.bool:
                raise InputError(f"z must hold integer code indices (B, {h}, {w}) in [0, {K}) for a VQ-VAE, "
                                 f"got dtype {z.dtype}")
            if z.ndim != 3 or tuple(z.shape[1:]) != (h, w) or z.shape[0] == 0:
                raise InputError(f"z must have shape (B, {h}, {w}) (code indices), got {tuple(z.shape)}")
            lo, hi = int(z.min()), int(z.max())
            if lo < 0 or hi >= K:
                raise InputError(f"z code indices must lie in [0, {K}), got values in [{lo}, {hi}]")
            return z.long()
        D = model.config.latent_dim
        if not z.is_floating_point():
            raise InputError(f"z must hold floats of shape (B, {D}), got dtype {z.dtype}")
        if z.ndim != 2 or z.shape[1] != D or z.shape[0] == 0:
            raise InputError(f"z must have shape (B, {D}), got {tuple(z.shape)}")
        return model.check_latent(z, "z")

    # -- the worker side ---------------------------------------------------------------------------
    def _run_batch(self, jobs: list[Job]) -> None:
        # snapshot: a swap during this batch does not affect it; a canary removed while its requests
        # waited serves them from production (and their records say so)
        dep = self._deployment_for(jobs[0].payload.route)
        if jobs[0].payload.route == "canary" and dep is self._current:
            for j in jobs:
                j.payload.route = "production"
        try:
            results = self._compute(dep, [j.payload for j in jobs])
        except InputError:
            if len(jobs) == 1:
                raise
            # one request's fault (found only by the model) must not fail its batch-mates
            for job in jobs:
                try:
                    self._finish(dep, [job], self._compute(dep, [job.payload]))
                except Exception as exc:
                    job.future.set_exception(exc)
            return
        self._finish(dep, jobs, results)

    def _finish(self, dep: Deployment, jobs: list[Job], results: list[Result]) -> None:
        now = time.perf_counter()
        for job, res in zip(jobs, results, strict=True):
            res.latency_s = now - job.submitted
            job.future.set_result(res)
        batch = sum(r.n for r in results)
        captured = self._to_capture(dep, jobs)
        if self._post is not None and (self.observers or self.sink is not None or captured):
            self._post.submit(lambda: self._after(results, batch, captured))

    def _to_capture(self, dep: Deployment, jobs: list[Job]) -> list[tuple[str, str, str, torch.Tensor, float]]:
        """(name, version, request id, x (n, C, H, W), arrival) of this batch's requests the capture
        keeps: accepted by the gate (they got here), on the production route, an inspecting endpoint."""
        cap, first = self.capture, jobs[0].payload
        if cap is None or first.endpoint not in INSPECTING or first.route != "production":
            return []
        return [(dep.name, dep.version, j.payload.request_id, j.payload.x, j.payload.arrived) for j in jobs
                if cap.selected(j.payload.request_id)]

    def _after(self, results: list[Result], batch: int,
               captured: list[tuple[str, str, str, torch.Tensor, float]] = ()) -> list[RequestRecord]:
        """Runs on the records thread: the metrics observers, the capture, then the request records for the sink."""
        for fn in self.observers:
            fn(results, batch)
        for name, version, rid, x, arrived in captured:
            try:
                self.capture.offer(name, version, rid, x, arrived)
            except Exception:  # a capture fault must not cost the records
                log.exception("%s: capture of request %s failed", self.name, rid)
        return [rec for r in results for rec in _records(r)] if self.sink is not None else []

    def _compute(self, dep: Deployment, payloads: list[_Payload]) -> list[Result]:
        model, endpoint = dep.model, payloads[0].endpoint
        dev = model.device
        sizes = [p.n for p in payloads]
        y = None
        if payloads[0].y is not None:
            y = (torch.cat([p.y for p in payloads]) if len(payloads) > 1 else payloads[0].y).to(dev)
        outputs: dict[str, torch.Tensor] = {}
        stats: Stats | None = None
        with torch.inference_mode():
            if endpoint == "generate":
                p = payloads[0]
                g = torch.Generator().manual_seed(p.seed)
                outputs["images"] = model.sample(p.n, y, generator=g).float().cpu()
            else:
                x = (torch.cat([p.x for p in payloads]) if len(payloads) > 1 else payloads[0].x).to(dev)
                if endpoint == "decode":
                    outputs["images"] = model.decode(x, y).mean.float().cpu()
                    if not model.discrete_latent:  # code indices have no norm worth reporting
                        stats = Stats(latent_norm=x.float().norm(dim=1).cpu())
                        stats.latent_norm_above_limit = stats.latent_norm > self.latent_norm_limit
                else:
                    ins = model.inspect(x, y, check=False)  # prepare checked every payload's values
                    stats = self._stats(dep, ins)
                    if endpoint == "reconstruct":
                        outputs["reconstruction"] = ins.reconstruction.float().cpu()
                    elif endpoint == "encode":
                        if ins.latent is not None:
                            outputs["mean"] = stats.latent
                        if ins.logvar is not None:
                            outputs["logvar"] = stats.logvar
                        if ins.codes is not None:
                            outputs["codes"] = stats.codes
        results, lo = [], 0
        batch = sum(sizes)
        alone = len(payloads) == 1  # the whole batch is this request's: no row slicing
        for p, n in zip(payloads, sizes, strict=True):
            hi = lo + n
            results.append(Result(endpoint, dep.name, dep.version, p.request_id,
                                  outputs if alone else {k: v[lo:hi] for k, v in outputs.items()},
                                  stats if alone or stats is None else stats.rows(lo, hi),
                                  dep.profile is not None, batch, seed=p.seed, arrived=p.arrived, route=p.route,
                                  pixel_mean=p.extra.get("pixel_mean"), pixel_var=p.extra.get("pixel_var")))
            lo = hi
        return results

    def _stats(self, dep: Deployment, ins: Any) -> Stats:
        def cpu(t):  # under inference_mode: no autograd history to detach; float()/cpu() are no-ops on CPU
            if t is None:
                return None
            return (t.float() if t.is_floating_point() else t).cpu()

        s = Stats(recon_mse=cpu(ins.recon_mse), recon_nats=cpu(ins.recon_nats), kl=cpu(ins.kl),
                  latent_norm=cpu(ins.latent_norm), latent=cpu(ins.latent), logvar=cpu(ins.logvar),
                  codes=cpu(ins.codes))
        s.latent_norm_above_limit = s.latent_norm > self.latent_norm_limit
        p99 = dep.thresholds.get("recon_nats_p99")
        if p99 is not None:
            s.recon_above_p99 = s.recon_nats > p99
        return s

    # -- the shadow: a copy of the request, off the request path -------------------------------------
    def _mirror(self, payload: _Payload) -> None:
        """Queue a copy of an accepted request for the shadow; a full queue drops it (counted). One deque
        append, no lock and no wake-up: nothing here waits on the shadow."""
        if len(self._shadow_q) >= self.shadow_queue:
            self.shadow_dropped += 1
            return
        self._shadow_q.append((payload, time.perf_counter()))

    SHADOW_INTERVAL_S = 0.02  # the shadow drains its queue this often, in calls of up to SHADOW_BATCH images
    SHADOW_BATCH = 16

    def _shadow_loop(self) -> None:
        # Woken by a timer, never per request: a wake-up per request and a model call per request
        # cost production its GIL share (measured: +0.45 ms at p50 on this machine); batches of what
        # arrived in the last 20 ms cost one model call each.
        if os.environ.get("VAEKIT_SHADOW_NICE"):
            with contextlib.suppress(AttributeError, OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), int(os.environ["VAEKIT_SHADOW_NICE"]))
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            stopping = self._stop.wait(self.SHADOW_INTERVAL_S)
            while self._shadow_q:
                proc = self._shadow_proc
                if proc is None:  # a model call here shares the interpreter with production: wait for a gap
                    self._wait_for_idle_production()
                batch: list[tuple[_Payload, float]] = []
                n = 0
                while self._shadow_q and n < self.SHADOW_BATCH:
                    item = self._shadow_q.popleft()
                    batch.append(item)
                    n += item[0].n
                if proc is None:
                    self._run_shadow(batch)
                else:
                    proc.send(batch)
                    self.shadow_served += n
            if stopping:
                return

    def _wait_for_idle_production(self, max_wait_s: float = 0.05) -> None:
        """Start a shadow call only while production has no batch running and none queued (the two
        share the GIL and, on a small machine, the cores); after ``max_wait_s`` go anyway, so a
        saturated service still feeds its shadow (or drops, counted, when the queue fills)."""
        b = self._batcher
        deadline = time.perf_counter() + max_wait_s
        while b is not None and (b._running or b.depth) and time.perf_counter() < deadline:
            time.sleep(0.002)  # a coarse poll: each wake-up takes the GIL from production

    def _run_shadow(self, batch: list[tuple[_Payload, float]], dep: Deployment | None = None) -> None:
        """Serve mirrored requests on the shadow deployment (``dep``: the one to use, default the
        service's shadow; the shadow process passes its own production) and queue their records."""
        dep = dep if dep is not None else self._sides["shadow"]
        if dep is None:
            self.shadow_dropped += len(batch)
            return
        groups: dict[Any, list[tuple[_Payload, float]]] = {}
        for p, t in batch:  # one model call per compatible group (the same rule as the batcher's)
            ok = tuple(p.x.shape[1:]) == tuple(dep.model.input_shape) and (p.y is None) == (not dep.model.conditional)
            if not ok:
                self.shadow_dropped += 1
                continue
            groups.setdefault((p.endpoint, None if p.y is None else p.y.dtype, p.x.dtype), []).append((p, t))
        for items in groups.values():
            payloads = [_shadow_payload(p) for p, _ in items]
            try:
                results = self._compute(dep, payloads)
            except Exception:  # a broken shadow is logged and counted; production never sees it
                self.shadow_errors += len(items)
                if self.shadow_errors <= len(items) or self.shadow_errors % 1000 < len(items):
                    log.exception("%s: shadow %s failed (%d failures so far)", self.name, dep.version,
                                  self.shadow_errors)
                continue
            now = time.perf_counter()
            for r, (_, t) in zip(results, items, strict=True):
                r.latency_s = now - t
            self.shadow_served += len(items)
            if self._post is not None and self.sink is not None:
                self._post.submit(lambda rs=results: [rec for r in rs for rec in _records(r)])

    def describe(self) -> dict[str, Any]:
        """The serving model and settings (what GET /v1/models reports)."""
        info = self.deployment.describe()
        canary, shadow = self._sides["canary"], self._sides["shadow"]
        info.update(reference=self.source.reference, follows=bool(self.source.follows),
                    latent_norm_limit=self.latent_norm_limit, max_images=self.max_images,
                    batching={"max_batch_size": self.max_batch_size, "max_wait_ms": self.max_wait_ms},
                    swaps=self.swaps, last_reload_error=self.last_reload_error,
                    routing={"canary": canary.version if canary else None,
                             "shadow": shadow.version if shadow else None,
                             "canary_share": self.routing.canary_share, "shadow_share": self.routing.shadow_share,
                             "canary_source": getattr(self._side_sources["canary"], "reference", None),
                             "shadow_source": getattr(self._side_sources["shadow"], "reference", None),
                             "shadow_served": self.shadow_served, "shadow_dropped": self.shadow_dropped,
                             "shadow_errors": self.shadow_errors,
                             "shadow_process": self._shadow_proc.describe() if self._shadow_proc else None},
                    records={"written": self.records_written, "dropped": self.records_dropped,
                             "store": getattr(self.store, "uri", None)},
                    capture=self.capture.describe() if self.capture is not None else None)
        return info


class _NullSink:
    def write(self, records: list[RequestRecord]) -> None:
        pass


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _shadow_payload(p: _Payload) -> _Payload:
    return _Payload(p.endpoint, p.x, p.y, p.request_id, p.arrived, p.seed, p.n, "shadow", p.extra)


def _records(r: Result) -> list[RequestRecord]:
    arrived = r.arrived
    out = []
    s = r.stats
    per = s.images() if s is not None and r.n else None
    latent = s.latent.tolist() if s is not None and s.latent is not None else None
    codes = s.codes.tolist() if s is not None and s.codes is not None else None
    pm = r.pixel_mean.tolist() if r.pixel_mean is not None else None
    pv = r.pixel_var.tolist() if r.pixel_var is not None else None
    for i in range(r.n):
        rec = RequestRecord(time=arrived, request_id=r.request_id, model=r.model, version=r.version,
                            endpoint=r.endpoint, latency_s=r.latency_s, route=r.route, index=i,
                            batch_size=r.batch_size, pixel_mean=pm[i] if pm is not None else None,
                            pixel_var=pv[i] if pv is not None else None)
        if per is not None:
            d = per[i]
            rec.recon_mse, rec.recon_nats, rec.kl, rec.latent_norm = (d["recon_mse"], d["recon_nats"], d["kl"],
                                                                      d["latent_norm"])
            rec.verdicts = d["verdicts"]
            rec.latent = latent[i] if latent is not None else None
            rec.codes = codes[i] if codes is not None else None
        out.append(rec)
    return out


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    """A tensor from a tensor, NumPy array or nested list; InputError for anything else."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise InputError(f"{name} must hold numbers, got a NumPy array of dtype {value.dtype}")
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, list | tuple):
        try:
            arr = np.asarray(value)
        except ValueError as exc:
            raise InputError(f"{name} must be a rectangular nested list of numbers: {exc}") from exc
        if arr.dtype.kind not in "biuf":
            raise InputError(f"{name} must be a rectangular nested list of numbers, got elements of kind "
                             f"{arr.dtype} (ragged rows or non-numbers)")
        return torch.from_numpy(arr.astype(np.float32) if arr.dtype.kind == "f" else arr.astype(np.int64))
    raise InputError(f"{name} must be a tensor, an array or a nested list of numbers, got {type(value).__name__}")


def _short(v: Any) -> Any:
    return v if not isinstance(v, torch.Tensor | np.ndarray) else f"array of shape {tuple(v.shape)}"


def _example_condition(model: BaseModel) -> Callable[[int], torch.Tensor | None]:
    """y for warm-up batches of size b (class 0 / zero vectors), None for unconditional models."""
    if not model.conditional:
        return lambda b: None
    c = model.config
    if c.condition == "class":
        return lambda b: torch.zeros(b, dtype=torch.long, device=model.device)
    return lambda b: torch.zeros(b, c.cond_size, device=model.device, dtype=model.dtype)


def shadow_child_main(conn: Any, spec: tuple[Any, ...], store_uri: str, options: dict[str, Any]) -> None:
    """The shadow process (:mod:`vaekit.serving.shadow_process`): a ModelService of the shadow source
    whose ``_run_shadow`` serves what the parent sends, so its records are the thread's records."""
    import pickle

    from vaekit.serving.shadow_process import RELOAD, open_source

    with contextlib.suppress(OSError):
        os.nice(options["nice"])
    if hasattr(os, "SCHED_IDLE"):
        # SCHED_IDLE (Linux): the child runs only on a core nothing else wants, and a production thread that
        # wakes takes the core at once; nice 10 alone still let a shadow pass delay it by a scheduler slice
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    svc = ModelService(open_source(spec), device=options["device"], store=store_uri, gate=False, canary=False,
                       shadow=False, threads=options["threads"], poll_interval_s=options["poll_interval_s"],
                       latent_norm_limit=options["latent_norm_limit"], max_batch_size=1)
    svc.start()
    try:
        while True:
            try:
                msg = pickle.loads(conn.recv_bytes())
            except EOFError:  # the service is gone
                break
            if msg is None:
                break
            if msg == RELOAD:
                svc.reload()
                continue
            batch = [(_Payload(e, torch.from_numpy(x), None if y is None else torch.from_numpy(y), rid, arrived,
                               None, n, "shadow", extra or {}), t)
                     for e, x, y, rid, arrived, t, n, extra in msg]
            svc._run_shadow(batch, svc.deployment)  # the child's production is the service's shadow
    finally:
        svc.close()
