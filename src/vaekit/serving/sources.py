"""Model sources: where a service gets its model from, and how it learns that a newer one exists.

A source turns a reference into a :class:`Loaded` (model, version label, reference profile or None)
and answers ``current_version()`` cheaply, so a service can poll it and reload when the answer
changes. :class:`FolderSource` serves a plain model folder (``vaekit.load_model``); its version is
a digest of the folder's files, so overwriting the folder (``model.save`` is atomic) is a new
version. Registry references (``name@alias``, ``name/3``) plug in as another source.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from vaekit.errors import ConfigError, ModelFormatError, describe
from vaekit.models import BaseModel, load_model

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class Loaded:
    """One loaded model version. ``profile`` is the reference profile (``vaekit.registry.profile.Profile``
    or anything with a ``quantiles`` dict of dicts), None when the artifact has none."""

    model: BaseModel
    version: str
    profile: Any = None


@runtime_checkable
class ModelSource(Protocol):
    """What ModelService needs from wherever models come from."""

    reference: str  # what the user asked for (a folder, ``name@alias``, ``name/3``)
    name: str  # the model's name in URLs (/v1/models/{name}/...)
    follows: bool  # True when the reference can move (an alias, a watched folder): worth polling

    def current_version(self) -> str:
        """The version label the reference points to now (cheap; called by the poller)."""
        ...

    def load(self, device: torch.device) -> Loaded:
        """Load what the reference points to now, on ``device``, in eval mode."""
        ...


def check_name(name: Any) -> str:
    """A model name usable in a URL path segment; ConfigError otherwise."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"model name must match {NAME_RE.pattern} (letters, digits, '.', '_', '-'), "
                          f"got {describe(name)}")
    return name


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for part in ("config.json", "model.safetensors"):
        h.update(part.encode() + b"\0")
        with open(folder / part, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):  # noqa: B023 - f is bound per iteration
                h.update(chunk)
    return h.hexdigest()[:12]


def read_folder_profile(folder: Path) -> Any:
    """The reference profile stored in a model artifact, or None when there is none (or the profile
    module is not part of this install)."""
    try:
        from vaekit.registry.profile import read_profile  # the artifact/registry layer, when present
    except ImportError:
        return None
    try:
        return read_profile(folder)
    except Exception:  # no profile in this artifact: verdicts are reported as unavailable
        return None


class FolderSource:
    """A plain model folder. The version label is ``sha256[:12]`` of ``config.json`` and
    ``model.safetensors``; ``current_version`` re-hashes only when a file's size or mtime changed."""

    follows = True

    def __init__(self, path: str | os.PathLike, name: str | None = None):
        self.path = Path(path)
        if not (self.path / "config.json").is_file() or not (self.path / "model.safetensors").is_file():
            raise ModelFormatError(f"{self.path} is not a vaekit model folder (needs config.json and "
                                   "model.safetensors)")
        self.reference = str(self.path)
        self.name = check_name(name if name is not None else re.sub(r"[^A-Za-z0-9._-]", "-", self.path.name) or "model")
        self._stamp: tuple | None = None
        self._version = ""

    def _stat(self) -> tuple:
        return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in
                     (os.stat(self.path / p) for p in ("config.json", "model.safetensors")))

    def current_version(self) -> str:
        try:
            stamp = self._stat()
        except FileNotFoundError:  # the folder is being replaced (two renames): nothing new yet
            if self._version:
                return self._version
            raise
        if stamp != self._stamp:
            self._version, self._stamp = _digest(self.path), stamp
        return self._version

    def load(self, device: torch.device) -> Loaded:
        for _ in range(5):  # the folder can be replaced while it is read: retry until a stable read
            before = self.current_version()
            model = load_model(self.path, map_location=device)
            if self.current_version() == before:
                return Loaded(model, before, read_folder_profile(self.path))
        raise ModelFormatError(f"{self.path} kept changing while it was loaded (5 tries)")


class RegistrySource:
    """A registry reference: ``name@alias`` (follows the alias), ``name`` (follows the latest version) or
    ``name/3`` (pinned). The version label is the registry's version number (``"3"``), so OIP clients can
    address ``/v2/models/name/versions/3``. ``registry`` is a ``ModelRegistry`` or its URI (None: the
    registry's default, ``$VAEKIT_REGISTRY``)."""

    def __init__(self, reference: str, registry: Any = None, name: str | None = None):
        from vaekit.registry import ModelRegistry, parse_ref

        self.ref = parse_ref(reference)
        self.registry = registry if isinstance(registry, ModelRegistry) else ModelRegistry(registry)
        self.reference = str(self.ref)
        self.name = check_name(name if name is not None else self.ref.name)
        self.follows = self.ref.version is None

    def current_version(self) -> str:
        return str(self.registry.get(self.ref).version)

    def load(self, device: torch.device) -> Loaded:
        ver = self.registry.get(self.ref)  # one lookup: the model and its label always agree
        model = load_model(ver.artifact_path, map_location=device)
        return Loaded(model, str(ver.version), read_folder_profile(ver.artifact_path))

    def move_alias(self, alias: str, version: int, reason: str) -> None:
        """Point ``alias`` of this model at ``version`` (the admin route); the history keeps ``reason``."""
        self.registry.set_alias(self.ref.name, alias, version, reason or "moved through the serving admin API",
                                actor="vaekit-serve-admin")


def resolve_source(reference: str | os.PathLike | ModelSource, name: str | None = None,
                   registry: Any = None) -> ModelSource:
    """A source for ``reference``: a ModelSource is returned as is; an existing folder is a
    :class:`FolderSource`; anything else is a registry reference (``name@alias``, ``name/3``, ``name``)
    looked up in ``registry`` (a ModelRegistry or URI; None: ``$VAEKIT_REGISTRY`` or the default)."""
    if isinstance(reference, ModelSource):
        return reference
    ref = str(reference)
    if Path(ref).is_dir():
        return FolderSource(ref, name)
    forms = "a model folder (config.json + model.safetensors) or a registry reference (name@alias, name/3, name)"
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1 or os.sep != "/" and os.sep in ref:
        raise ConfigError(f"model reference must be {forms}, got {describe(ref)}: no such folder")
    if registry is None and not _default_registry_exists():
        raise ConfigError(f"model reference must be {forms}, got {describe(ref)}: no such folder, and no registry "
                          "to look it up in (pass --registry URI or set VAEKIT_REGISTRY)")
    src = RegistrySource(ref, registry, name)
    src.current_version()  # fail now, naming the reference, when it does not resolve
    return src


def _default_registry_exists() -> bool:
    """True unless the default registry is a SQLite file that does not exist (opening it would create it)."""
    from vaekit.registry.core import DEFAULT_URI, ENV_URI

    uri = os.environ.get(ENV_URI) or DEFAULT_URI
    return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).is_file()
