"""Request capture: a share of the served inputs kept as image shards, indexed in the record store.

This is the "recent production data" the retraining pipelines train on (docs/deployment.md).
``Capture(folder, store, share=0.1)`` keeps the images of a ``share`` of requests, chosen by a
keyed BLAKE2b hash of the request id (:func:`vaekit.deploy.routing.unit_hash`, with its own salt):
the same request ids are kept in every service process, on any machine, and the choice is
independent of which requests the canary serves. The service hands it only what the
data-quality gate accepted on the production route (``ModelService(capture=...)``); rejected
images, canary and shadow traffic are never captured.

Off the request path: the service calls :meth:`Capture.offer` on its records thread; images are
quantised to uint8 (grey levels 0..255, as shards hold them) and buffered; a shard is written
(atomically, :func:`vaekit.data.shards.write_shard`) when ``shard_images`` are buffered, when the
buffer's oldest image is older than ``max_shard_age_s`` as another arrives, when the serving
version changes, and on :meth:`Capture.close` (``ModelService.close``). Each shard gets one row in
the store's capture index (:meth:`RecordStore.captures`). A crash loses at most the buffer.

Shards are named ``capture-<first arrival, Unix microseconds, 16 digits>-<pid>-<n>.npz`` so that
name order (how a shard folder is read, :func:`vaekit.data.shards.load_shards`) is capture order,
and several processes can share one folder. Besides ``images`` and ``labels`` (-1: unlabelled)
each holds ``times`` (N,) float64 arrival times and ``request_ids`` (N,) strings.

Retention (``max_age_s``, ``max_images``) runs after each shard: the shards of this folder whose
last image is older than ``max_age_s``, then the oldest while the folder's indexed images exceed
``max_images``, are deleted with their index rows.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaekit.data.dataset import ImageSplit
from vaekit.errors import ConfigError, InputError, check_share, describe

log = logging.getLogger("vaekit.serving.capture")

DEFAULT_SHARE = 0.1  # the default: a tenth of the served requests
SALT = "vaekit/capture"  # distinct from the routing salt: capture is independent of the canary draw
PREFIX = "capture-"


def _check_limit(name: str, value: Any, integer: bool = False) -> None:
    kind = int if integer else int | float
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind) or not value > 0
                              or not math.isfinite(value)):
        raise ConfigError(f"{name} must be {'a positive integer' if integer else 'a positive number'} or None, "
                          f"got {describe(value)}")


@dataclass
class _Buffer:
    model: str
    version: str
    images: list[torch.Tensor]  # each (n, C, H, W) uint8
    times: list[float]  # one per image, Unix seconds
    request_ids: list[str]

    @property
    def n(self) -> int:
        return len(self.times)


class Capture:
    """Keeps ``share`` of the requests' images as shards in ``folder``, indexed in ``store``.

    ``store``: a :class:`vaekit.monitoring.store.RecordStore` or its URI (the index and retention
    live there); ``shard_images``: images per shard; ``max_shard_age_s``: seconds after which a
    partly filled shard is written when the next image arrives; ``max_age_s`` / ``max_images``:
    retention (None: keep); ``salt``: changes which request ids are kept.
    """

    def __init__(self, folder: str | os.PathLike, store: Any, *, share: float = DEFAULT_SHARE,
                 shard_images: int = 1000, max_shard_age_s: float = 60.0, max_age_s: float | None = None,
                 max_images: int | None = None, salt: str = SALT):
        self.share = check_share("capture share", share)
        _check_limit("shard_images", shard_images, integer=True)
        _check_limit("max_shard_age_s", max_shard_age_s)
        _check_limit("max_age_s", max_age_s)
        _check_limit("max_images", max_images, integer=True)
        if shard_images is None or max_shard_age_s is None:
            raise ConfigError("shard_images and max_shard_age_s must be given (positive)")
        if not isinstance(salt, str):
            raise ConfigError(f"salt must be a string, got {describe(salt)}")
        self._own_store = isinstance(store, str)
        if isinstance(store, str):
            from vaekit.monitoring.store import RecordStore

            store = RecordStore(store)
        if not callable(getattr(store, "add_capture", None)):
            raise ConfigError(f"store must be a record-store URI or a RecordStore (the capture index lives there), "
                              f"got {describe(store)}")
        self.folder = Path(folder).resolve()
        self.store = store
        self.shard_images, self.max_shard_age_s = int(shard_images), float(max_shard_age_s)
        self.max_age_s, self.max_images, self.salt = max_age_s, max_images, salt
        self._buf: _Buffer | None = None
        self._lock = threading.Lock()
        self._seq = 0
        self.captured = 0  # images buffered so far
        self.written = 0  # images written to shards
        self.shards = 0  # shards written by this object
        self.deleted = 0  # shards removed by retention
        self.errors = 0  # shard writes that failed (logged; their images are lost)

    def selected(self, request_id: str) -> bool:
        """True when the request with this id is captured (the same answer in every process)."""
        if self.share >= 1.0:
            return True
        if self.share <= 0.0:
            return False
        from vaekit.deploy.routing import unit_hash

        return unit_hash(request_id, self.salt) < self.share

    def offer(self, model: str, version: str, request_id: str, x: torch.Tensor, arrived: float) -> int:
        """Buffer the images x (n, C, H, W) floats in [0, 1] of one accepted production request when
        its id is selected; returns how many were kept (0 or n). Writes a shard when one is due."""
        if not self.selected(request_id):
            return 0
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
            raise InputError(f"x must be a float tensor (n, C, H, W), got {describe(x)}")
        img = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()  # (n, C, H, W)
        n = int(img.shape[0])
        with self._lock:
            b = self._buf
            if b is not None and ((b.model, b.version) != (model, str(version))
                                  or tuple(b.images[0].shape[1:]) != tuple(img.shape[1:])
                                  or arrived - b.times[0] > self.max_shard_age_s):
                self._write_locked()
            if self._buf is None:
                self._buf = _Buffer(model, str(version), [], [], [])
            self._buf.images.append(img)
            self._buf.times += [float(arrived)] * n
            self._buf.request_ids += [request_id] * n
            self.captured += n
            if self._buf.n >= self.shard_images:
                self._write_locked()
        return n

    @property
    def pending(self) -> int:
        """Images buffered, not yet in a shard."""
        b = self._buf
        return b.n if b is not None else 0

    def flush(self) -> Path | None:
        """Write the buffered images as a shard now (None when nothing is buffered); returns its path."""
        with self._lock:
            return self._write_locked()

    def close(self) -> None:
        """Write what is buffered, then close a store this object opened."""
        self.flush()
        if self._own_store:
            self.store.close()

    def _write_locked(self) -> Path | None:
        from vaekit.data.shards import write_shard

        b, self._buf = self._buf, None
        if b is None or b.n == 0:
            return None
        self._seq += 1
        path = self.folder / f"{PREFIX}{int(b.times[0] * 1e6):016d}-{os.getpid()}-{self._seq:06d}.npz"
        try:
            write_shard(path, torch.cat(b.images), extra={"times": np.asarray(b.times, np.float64),
                                                          "request_ids": np.asarray(b.request_ids, np.str_)})
            self.store.add_capture(str(path), b.model, b.version, b.n, min(b.times), max(b.times))
        except Exception:  # a full disk or a store away must not stop serving: log, count, go on
            self.errors += 1
            log.exception("capture: writing %d images to %s failed; they are lost", b.n, path)
            return None
        self.written += b.n
        self.shards += 1
        try:
            self.retain()
        except Exception:
            log.exception("capture: retention in %s failed (it runs again after the next shard)", self.folder)
        return path

    def retain(self, now: float | None = None) -> list[dict[str, Any]]:
        """Apply ``max_age_s`` and ``max_images`` to this folder's indexed shards: delete the files,
        then their index rows; returns the rows removed (oldest first)."""
        if self.max_age_s is None and self.max_images is None:
            return []
        now = time.time() if now is None else float(now)
        rows = [r for r in self.store.captures() if Path(r["path"]).parent == self.folder]
        drop = [r for r in rows if self.max_age_s is not None and r["last_time"] < now - self.max_age_s]
        keep = [r for r in rows if r not in drop]
        if self.max_images is not None:
            total = sum(r["count"] for r in keep)
            while keep and total > self.max_images:
                total -= keep[0]["count"]
                drop.append(keep.pop(0))
        for r in drop:
            Path(r["path"]).unlink(missing_ok=True)
        self.store.delete_captures(r["id"] for r in drop)
        self.deleted += len(drop)
        return drop

    def describe(self) -> dict[str, Any]:
        """Settings and counters (what GET /v1/models reports under ``capture``)."""
        return {"folder": str(self.folder), "share": self.share, "shard_images": self.shard_images,
                "max_shard_age_s": self.max_shard_age_s, "max_age_s": self.max_age_s, "max_images": self.max_images,
                "captured": self.captured, "written": self.written, "pending": self.pending, "shards": self.shards,
                "deleted": self.deleted, "errors": self.errors}


def load_captures(store: Any, folder: str | os.PathLike, *, model: str | None = None, start: float | None = None,
                  end: float | None = None) -> ImageSplit:
    """The captured images of ``folder`` that arrived in [start, end) (Unix seconds; None: open),
    from the store's index, in capture order; ``model`` filters by the served model's name.

    A shard whose file is gone (retention removed it since the listing) is skipped. Raises
    InputError when the window holds no image."""
    from vaekit.data.shards import read_shard

    folder = Path(folder).resolve()
    parts: list[ImageSplit] = []
    for row in store.captures(model=model, start=start, end=end):
        path = Path(row["path"])
        if path.parent != folder or not path.is_file():
            continue
        split = read_shard(path)
        with np.load(path, allow_pickle=False) as doc:
            times = doc["times"] if "times" in doc.files else np.full(len(split), row["first_time"])
        keep = np.ones(len(split), bool)
        if start is not None:
            keep &= times >= start
        if end is not None:
            keep &= times < end
        idx = torch.from_numpy(np.flatnonzero(keep))
        parts.append(ImageSplit(split.images[idx], split.labels[idx]))
    parts = [p for p in parts if len(p)]
    if not parts:
        raise InputError(f"no captured images of model {model!r} in {folder} arrived in [{start}, {end}) "
                         f"(the store's capture index lists none)")
    return ImageSplit(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


__all__ = ["DEFAULT_SHARE", "Capture", "load_captures"]
