"""Start the emergency retrain when a drift alert fires: a hook for :class:`vaekit.monitoring.monitor.Monitor`.

``RetrainTrigger(rules, capture_dir, out)`` is called by the monitor after each iteration
(``Monitor(..., hooks=[trigger])``; ``vaekit monitor run --on-alert-retrain RULE[,RULE]``). When
one of ``rules`` fires on the production route for the version ``NAME@production`` points at, it
starts ``vaekit retrain emergency --name NAME --data CAPTURE_DIR`` (the same pipeline as the CLI,
:mod:`vaekit.deploy.pipelines`) **once per alert episode**, in its own process: training's memory
and threads never touch the monitor, the monitor loop never waits for it, and a restarted monitor
does not stop it.

An episode is a run of overlapping firing alerts of ``rules`` on one production version: each
started episode has a folder ``OUT/NAME-vVERSION-<since>/`` holding ``trigger.json`` (the alerts
it covers, by rule, version and the time they started firing; the command; the process id; its
exit status once seen) and the pipeline's own folder and log. Before starting, the trigger reads
those files, so a restarted monitor (whose alerts still fire, rebuilt from the store) starts
nothing twice; an alert that starts firing while another of the same episode still fires joins
that episode. The check is level-triggered (what is firing now, not only this iteration's
events), so a monitor that crashed between storing an event and starting the pipeline starts it
when it comes back. A later episode (the alerts resolved, then fired again) starts a new retrain.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vaekit.atomic import atomic_write_bytes
from vaekit.errors import ConfigError, describe

log = logging.getLogger("vaekit.deploy.trigger")
MARKER = "trigger.json"

Launcher = Callable[[list[str], Path], Any]  # (command, log file) -> a handle with poll() -> exit status or None


def launch_process(command: list[str], log_path: Path) -> subprocess.Popen:
    """Start ``command`` in its own session (a monitor stopped by Ctrl-C does not stop it), output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


class RetrainTrigger:
    """A monitor hook that starts the emergency pipeline once per alert episode of ``rules``.

    ``rules``: alert rule names (``vaekit.monitoring.alerts.default_rules``); ``capture_dir``: the
    service's capture folder (the pipeline's ``--data``); ``out``: where episode folders go;
    ``registry`` / ``artifacts`` / ``store``: passed to the pipeline (None: the monitor's registry
    and store URIs); ``extra_args``: more ``vaekit retrain`` arguments (e.g. ``--epochs 3``);
    ``launcher``: how the command is started (default :func:`launch_process`).
    """

    def __init__(self, rules: Sequence[str], capture_dir: str | os.PathLike, out: str | os.PathLike = "pipelines",
                 *, registry: str | None = None, artifacts: str | None = None, store: str | None = None,
                 extra_args: Sequence[str] = (), launcher: Launcher = launch_process):
        rules = list(rules) if not isinstance(rules, str) else [rules]
        if not rules or not all(isinstance(r, str) and r for r in rules):
            raise ConfigError(f"rules must be a non-empty list of alert rule names, got {describe(rules)}")
        self.rules, self.capture_dir, self.out = rules, Path(capture_dir), Path(out)
        self.registry, self.artifacts, self.store = registry, artifacts, store
        self.extra_args, self.launcher = list(extra_args), launcher
        self.running: dict[Path, Any] = {}  # episode folder -> handle, until its exit status is recorded

    def check_rules(self, known: Sequence[str]) -> None:
        """ConfigError naming the rules that are not among ``known`` (the monitor's rule names)."""
        unknown = sorted(set(self.rules) - set(known))
        if unknown:
            raise ConfigError(f"--on-alert-retrain names unknown rule(s) {unknown}; the monitor's rules are "
                              f"{sorted(known)}")

    def __call__(self, monitor: Any, iteration: Any = None) -> Path | None:
        """After an iteration: record finished pipelines, then start one for a new episode; returns
        the new episode's folder (None when nothing was started)."""
        self._reap()
        version = _production_version(monitor)
        if version is None:
            return None
        state = monitor.state.get("production")
        firing = [a for a in (state.firing.values() if state is not None else ())
                  if a.status == "firing" and a.rule in self.rules and str(a.version) == version]
        if not firing:
            return None
        keys = {f"{a.rule}@{a.version}@{a.since}" for a in firing}
        for folder, doc in self.episodes(monitor.model, version):
            if keys & set(doc.get("alerts", [])):  # this episode already has its retrain
                if not keys <= set(doc["alerts"]):
                    doc["alerts"] = sorted(set(doc["alerts"]) | keys)
                    _write(folder / MARKER, doc)
                return None
        return self._start(monitor, version, keys, min(a.since for a in firing))

    def episodes(self, model: str, version: str) -> list[tuple[Path, dict[str, Any]]]:
        """The started episodes of ``model`` version ``version``: (folder, trigger.json) pairs, oldest first."""
        out = []
        for marker in sorted(self.out.glob(f"{model}-v{version}-*/{MARKER}")):
            try:
                out.append((marker.parent, json.loads(marker.read_text())))
            except (OSError, ValueError) as exc:  # a damaged marker counts as an episode: never start twice
                log.error("trigger: cannot read %s (%s); treating it as a started episode", marker, exc)
                out.append((marker.parent, {"alerts": []}))
        return out

    def command(self, monitor: Any, folder: Path) -> list[str]:
        """The ``vaekit retrain emergency`` command for an episode folder."""
        cmd = [sys.executable, "-m", "vaekit.cli.main", "retrain", "emergency", "--name", monitor.model,
               "--data", str(self.capture_dir), "--out", str(folder)]
        registry = self.registry or getattr(monitor.registry, "uri", None)
        store = self.store or getattr(monitor.store, "uri", None)
        if registry:
            cmd += ["--registry", registry]
        if self.artifacts:
            cmd += ["--artifacts", self.artifacts]
        if store:
            cmd += ["--store", store]
        return cmd + self.extra_args

    def _start(self, monitor: Any, version: str, keys: set[str], since: str) -> Path:
        folder = self.out / f"{monitor.model}-v{version}-{re.sub(r'[^0-9A-Za-z]', '', since)}"
        cmd = self.command(monitor, folder)
        doc = {"model": monitor.model, "version": version, "alerts": sorted(keys), "started": time.time(),
               "command": cmd, "pid": None, "exit_status": None}
        _write(folder / MARKER, doc)  # first: whatever happens next, this episode never starts again
        handle = self.launcher(cmd, folder / "pipeline.log")
        doc["pid"] = getattr(handle, "pid", None)
        _write(folder / MARKER, doc)
        self.running[folder] = handle
        log.warning("trigger: %s on %s/%s: started the emergency retrain (pid %s), log %s",
                    ", ".join(sorted(keys)), monitor.model, version, doc["pid"], folder / "pipeline.log")
        return folder

    def _reap(self) -> None:
        for folder, handle in list(self.running.items()):
            status = handle.poll()
            if status is None:
                continue
            del self.running[folder]
            doc = json.loads((folder / MARKER).read_text())
            doc["exit_status"] = status
            _write(folder / MARKER, doc)
            log.info("trigger: the emergency retrain in %s exited with status %s", folder, status)


def _production_version(monitor: Any) -> str | None:
    from vaekit.errors import RegistryLookupError

    try:
        v = monitor.registry.aliases(monitor.model).get("production")
    except RegistryLookupError:
        return None
    return None if v is None else str(v)


def _write(path: Path, doc: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode(), "write the trigger record")


__all__ = ["RetrainTrigger", "launch_process"]
