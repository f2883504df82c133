"""The shadow in its own process: production's interpreter only hands it the request's bytes.

A shadow on a thread of the service (the default) runs its model, its stats and its records in the
service's interpreter, taking turns with production for the one interpreter lock: on the 2-core
machine this project is measured on it added about 0.5 ms to production's p99 at one client
(docs/serving.md). ``ModelService(shadow_process=True)`` moves that work to a child process:

* the service's shadow thread drains the mirror queue every 20 ms, as before, but only pickles the
  requests' checked inputs (numpy arrays, protocol 5) and writes them to a pipe: no model call;
* the child (``spawn``, at ``nice`` 10 and, on Linux, the ``SCHED_IDLE`` policy, so that it runs
  only on a core nothing else wants and a production thread that wakes takes the core at once; with
  nice 10 alone a shadow pass still delayed production by a scheduler slice: +1.1 ms on p99 at one
  client, +0.3 with ``SCHED_IDLE``, docs/serving.md) runs a
  :class:`~vaekit.serving.service.ModelService` of its own on the shadow source, with the gate off
  (production already gated the images), and serves each batch through the same ``_run_shadow``
  code as the thread would: the same records, ``route="shadow"``, the request's id, the shadow's
  version, written by the child to the record store;
* the child follows the shadow source on its own (it polls it at the service's
  ``poll_interval_s``, and is told to reload when the service's shadow version changes);
* a child that dies or hangs never touches production: writes to a dead pipe are counted as
  errors, a full pipe blocks only the shadow thread (the mirror queue then fills and drops, counted).

It needs a record store given by URI (the child opens its own connection; SQLite in WAL mode and
PostgreSQL both take writers from several processes) and a shadow source the child can open again:
a model folder or a registry reference.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import pickle
import threading
from typing import Any

from vaekit.errors import ConfigError, describe

log = logging.getLogger("vaekit.serving.shadow")

RELOAD = "reload"


def source_spec(source: Any) -> tuple[Any, ...]:
    """What a child process needs to open ``source`` again: ("folder", path, name) or ("registry",
    reference, registry URI, artifact root, name). ConfigError for any other source."""
    from vaekit.serving.sources import FolderSource, RegistrySource

    if isinstance(source, FolderSource):
        return ("folder", str(source.path), source.name)
    if isinstance(source, RegistrySource):
        return ("registry", source.reference, source.registry.uri, str(source.registry.store.root), source.name)
    raise ConfigError(f"shadow_process=True needs a shadow that is a model folder or a registry reference, got "
                      f"{describe(source)}")


def open_source(spec: tuple[Any, ...]) -> Any:
    from vaekit.serving.sources import FolderSource, RegistrySource

    if spec[0] == "folder":
        return FolderSource(spec[1], spec[2])
    from vaekit.registry import ModelRegistry

    return RegistrySource(spec[1], ModelRegistry(spec[2], artifact_root=spec[3]), spec[4])


class ShadowProcess:
    """The parent's handle on the shadow child: ``send(batch)`` (the service's shadow thread only),
    ``reload()``, ``close()``. ``sent`` counts images handed over, ``errors`` those that could not be."""

    def __init__(self, target: Any, spec: tuple[Any, ...], store_uri: str, *, device: str, threads: int | None,
                 poll_interval_s: float | None, latent_norm_limit: float, nice: int = 10):
        """``target(conn, spec, store_uri, options)`` is the child's main function (a module-level
        function, so that ``spawn`` can import it: ``vaekit.serving.service.shadow_child_main``)."""
        ctx = mp.get_context("spawn")  # never fork a process that holds torch and server threads
        reader, self._conn = ctx.Pipe(duplex=False)
        options = {"device": device, "threads": threads or 1, "poll_interval_s": poll_interval_s,
                   "latent_norm_limit": latent_norm_limit, "nice": nice}
        self.process = ctx.Process(target=target, args=(reader, spec, store_uri, options),
                                   name="vaekit-shadow", daemon=True)
        self.process.start()
        reader.close()  # the child holds the read end; a dead child then shows as a broken pipe here
        self.sent = self.errors = 0
        self._broken = False
        self._lock = threading.Lock()  # the shadow thread sends, the poller asks for reloads: one writer at a time

    def send(self, batch: list[tuple[Any, float]]) -> None:
        """Hand (payload, enqueue time) pairs to the child. Blocks while the pipe is full (the caller
        is the shadow thread, never a request)."""
        if self._broken:
            self.errors += sum(p.n for p, _ in batch)
            return
        items = [(p.endpoint, p.x.numpy(), None if p.y is None else p.y.numpy(), p.request_id, p.arrived, t, p.n,
                  p.extra) for p, t in batch]
        self._write(pickle.dumps(items, protocol=5), sum(p.n for p, _ in batch))

    def reload(self) -> None:
        """Tell the child to look at its source now (the service's shadow version changed)."""
        self._write(pickle.dumps(RELOAD), 0)

    def _write(self, data: bytes, n: int) -> None:
        try:
            with self._lock:
                self._conn.send_bytes(data)
            self.sent += n
        except OSError as exc:  # BrokenPipeError: the child is gone
            self.errors += n
            if not self._broken:
                self._broken = True
                log.error("the shadow process (pid %s) is gone (%s, exit code %s): shadow requests are dropped",
                          self.process.pid, exc, self.process.exitcode)

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def describe(self) -> dict[str, Any]:
        return {"pid": self.process.pid, "alive": self.alive, "sent": self.sent, "errors": self.errors}

    def close(self, timeout: float = 10.0) -> None:
        """Let the child serve what it was sent and write its records, then stop it."""
        if not self._broken:
            with self._lock, contextlib.suppress(OSError):
                self._conn.send_bytes(pickle.dumps(None))
        self._conn.close()
        self.process.join(timeout)
        if self.process.is_alive():
            log.error("the shadow process (pid %s) did not stop in %.0f s: terminated", self.process.pid, timeout)
            self.process.terminate()
            self.process.join(5)
