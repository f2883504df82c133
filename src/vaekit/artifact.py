"""The one on-disk format of everything vaekit saves: models, FID extractors, reference profiles.

An artifact is a folder::

    config.json        {"format": "vaekit-artifact", "format_version": 2, "kind", "config", "metadata"}
    model.safetensors  the tensors (weights), safetensors, never pickle
    metrics.json       optional: evaluation figures
    <extra files>      optional: e.g. profile/profile.json, profile/profile.safetensors
    manifest.json      {"format": "vaekit-manifest", "format_version": 1, "kind", "algorithm": "sha256",
                        "files": {name: {"sha256": hex, "size": bytes}} of every other file,
                        "self_sha256": sha256 of the rest of the manifest as canonical JSON}

Reading verifies the manifest before anything is parsed: a file whose size or sha256 differs,
a file the manifest lists but the folder lacks, or a file (or link) the folder holds but the
manifest does not list raises :class:`~vaekit.errors.ArtifactIntegrityError` naming the file,
the expected and the actual hash. The bytes that are parsed are the bytes that were hashed, so a
file changed between the check and the read is caught too. The sha256 of ``manifest.json`` is
the artifact's :attr:`~Artifact.digest`: it covers every byte of the folder. The manifest's own
``self_sha256`` makes a damaged manifest say so (rather than blame the file whose hash it garbled).

Folders are written through :func:`vaekit.atomic.atomic_folder`: a reader or a crash never sees
half an artifact. Folders from before the manifest (format v1: ``config.json`` with format
``vaekit-model`` or ``vaekit-fid-extractor`` v1 and no ``manifest.json``) are read only when the
caller allows it (``load_model`` and ``load_extractor`` do, with a
:class:`~vaekit.errors.LegacyArtifactWarning`); :func:`verify_artifact` and the registry refuse
them; :func:`upgrade_legacy` rewrites one in the current format.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from vaekit.atomic import atomic_folder
from vaekit.config import from_dict
from vaekit.errors import (
    ArtifactError,
    ArtifactIntegrityError,
    ConfigError,
    InputError,
    LegacyArtifactWarning,
    ModelFormatError,
    describe,
)

FORMAT = "vaekit-artifact"
FORMAT_VERSION = 2  # version 1: the per-kind folders from before the manifest (see LEGACY_FORMATS)
MANIFEST_FORMAT = "vaekit-manifest"
MANIFEST_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
TENSORS = "model.safetensors"
METRICS = "metrics.json"
RESERVED = (MANIFEST, CONFIG, TENSORS, METRICS)
# format v1 (no manifest): config.json's "format" value -> the kind it holds
LEGACY_FORMATS = {"vaekit-model": "model", "vaekit-fid-extractor": "fid-extractor"}
_KIND = re.compile(r"[a-z][a-z0-9-]{0,63}")
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_CHUNK = 1 << 20
T = TypeVar("T")


# -- the manifest ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileEntry:
    """One manifest line: the file's sha256 (hex) and size in bytes."""

    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json``: the kind, every file (relative POSIX name -> entry) and the digest
    (sha256 hex of the manifest's own bytes, which covers every file of the artifact)."""

    kind: str
    files: dict[str, FileEntry]
    digest: str


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hash_file(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _check_name(name: Any) -> str:
    """An extra file's name: relative POSIX parts of letters, digits, ``._-`` (no hidden parts, no ``..``)."""
    if not isinstance(name, str) or not name:
        raise InputError(f"artifact file names must be non-empty strings, got {describe(name)}")
    parts = name.split("/")
    if any(not _PART.fullmatch(p) or p in (".", "..") for p in parts):
        raise InputError(f"artifact file name {name!r} must be a relative path of parts made of letters, digits, "
                         "'.', '_', '-' (not starting with '.' or '-')")
    if name in RESERVED:
        raise InputError(f"artifact file name {name!r} is reserved (written by write_artifact itself: {RESERVED})")
    return name


def _check_kind(kind: Any) -> str:
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise InputError(f"kind must be a lower-case name such as 'model' or 'fid-extractor' "
                         f"([a-z][a-z0-9-]*), got {describe(kind)}")
    return kind


def _json_object(folder: Path, name: str, data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{folder / name} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ArtifactError(f"{folder / name} must hold a JSON object, got a JSON {type(doc).__name__}")
    return doc


def _field(folder: Path, name: str, doc: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in doc:
        raise ArtifactError(f"{folder / name} has no {key!r} key")
    value = doc[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ArtifactError(f"{folder / name}: {key!r} must be a JSON {want}, got {describe(value)}")
    return value


def _canonical_sha256(doc: dict[str, Any]) -> str:
    return _sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


def _parse_manifest(folder: Path, data: bytes) -> Manifest:
    try:
        doc = _json_object(folder, MANIFEST, data)
    except ArtifactError as exc:
        raise ArtifactIntegrityError(str(folder), [(MANIFEST, f"is damaged: {exc}", None, None)]) from exc
    body = {k: v for k, v in doc.items() if k != "self_sha256"}
    actual = _canonical_sha256(body)
    if doc.get("self_sha256") != actual:
        raise ArtifactIntegrityError(str(folder), [(MANIFEST, f"is damaged: its content does not match its own "
                                                    f"checksum (self_sha256 {describe(doc.get('self_sha256'))}, "
                                                    f"content {actual})", doc.get("self_sha256"), actual)])
    if doc.get("format") != MANIFEST_FORMAT or doc.get("format_version") != MANIFEST_VERSION:
        raise ArtifactError(f"{folder / MANIFEST}: format {doc.get('format')!r} v{doc.get('format_version')!r}, "
                            f"expected {MANIFEST_FORMAT!r} v{MANIFEST_VERSION} (written by a newer vaekit?)")
    if doc.get("algorithm") != "sha256":
        raise ArtifactError(f"{folder / MANIFEST}: algorithm must be 'sha256', got {describe(doc.get('algorithm'))}")
    kind = _field(folder, MANIFEST, doc, "kind", str)
    files: dict[str, FileEntry] = {}
    for name, entry in _field(folder, MANIFEST, doc, "files", dict).items():
        ok = (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
              and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) and isinstance(entry.get("size"), int)
              and not isinstance(entry.get("size"), bool) and entry["size"] >= 0)
        if not ok or name == MANIFEST or ".." in name.split("/") or name.startswith("/"):
            raise ArtifactError(f"{folder / MANIFEST}: bad entry for {name!r}: {describe(entry)} "
                                "(want {'sha256': 64 hex digits, 'size': bytes})")
        files[name] = FileEntry(entry["sha256"], entry["size"])
    for need in (CONFIG, TENSORS):
        if need not in files:
            raise ArtifactError(f"{folder / MANIFEST} does not list {need} (every artifact has it)")
    return Manifest(kind, files, _sha256(data))


def _present_files(folder: Path) -> tuple[set[str], list[tuple[str, str, None, None]]]:
    """Relative names of the regular files under ``folder`` (the manifest excluded), and problems
    with what is not a regular file (links are never followed: one could point outside)."""
    names: set[str] = set()
    problems: list[tuple[str, str, None, None]] = []
    for root, dirs, files in os.walk(folder):
        for d in list(dirs):
            if (Path(root) / d).is_symlink():
                rel = (Path(root) / d).relative_to(folder).as_posix()
                problems.append((rel, "is a symbolic link, not part of an artifact", None, None))
                dirs.remove(d)
        for f in files:
            p = Path(root) / f
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink() or not p.is_file():
                problems.append((rel, "is a symbolic link or a special file, not part of an artifact", None, None))
            elif rel != MANIFEST:
                names.add(rel)
    return names, problems


def _mismatch(name: str, entry: FileEntry, sha: str, size: int) -> tuple[str, str, str, str] | None:
    if size == entry.size and sha == entry.sha256:
        return None
    what = f"size {size} bytes, expected {entry.size}; " if size != entry.size else ""
    return (name, f"{what}sha256 expected {entry.sha256}, got {sha}", entry.sha256, sha)


def _read_manifest(folder: Path) -> Manifest:
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not an artifact folder (no such folder)")
    mpath = folder / MANIFEST
    if not mpath.is_file() or mpath.is_symlink():
        legacy = _legacy_doc(folder)
        if legacy is not None:
            raise ArtifactError(
                f"{folder} was written before artifacts had a manifest (format {legacy.get('format')!r} v1), so "
                f"its files cannot be verified; upgrade it with "
                f"`python -c \"import vaekit.artifact as a; a.upgrade_legacy('{folder}')\"`")
        raise ArtifactError(f"{folder} is not a vaekit artifact (no {MANIFEST}{_format_note(folder)})")
    return _parse_manifest(folder, mpath.read_bytes())


def _format_note(folder: Path) -> str:
    """What config.json says its format is, for an error about a folder that is no artifact."""
    try:
        doc = json.loads((folder / CONFIG).read_bytes())
    except (OSError, ValueError):
        return ""
    if isinstance(doc, dict):
        return f"; its config.json has format {doc.get('format')!r} v{doc.get('format_version')!r}"
    return f"; its config.json holds a JSON {type(doc).__name__}"


def verify_artifact(folder: str | os.PathLike) -> Manifest:
    """Re-hash every file of the artifact at ``folder`` against its manifest; return the manifest.

    Raises ArtifactIntegrityError listing every problem (each file whose size or sha256 differs, with
    the expected and the actual hash; each missing file; each file or link not in the manifest),
    ArtifactError when the folder has no readable manifest (a format v1 folder included).
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    present, problems = _present_files(folder)
    issues: list[tuple[str, str, str | None, str | None]] = list(problems)
    for name, entry in sorted(manifest.files.items()):
        if name not in present:
            issues.append((name, "is listed in the manifest but missing", entry.sha256, None))
            continue
        bad = _mismatch(name, entry, *_hash_file(folder / name))
        if bad:
            issues.append(bad)
    issues += [(name, "is not listed in the manifest", None, None) for name in sorted(present - set(manifest.files))]
    if issues:
        raise ArtifactIntegrityError(str(folder), issues)
    return manifest


# -- reading ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Artifact:
    """A verified artifact folder: what :func:`read_artifact` returns.

    ``config``, ``metadata`` and ``metrics`` (None when absent) are plain JSON data; tensors are
    read on demand with :meth:`tensors` (each read re-checks the file's hash). ``manifest`` is None
    (and ``legacy`` True) for a format v1 folder read with ``allow_legacy``: nothing of it is verified.
    """

    kind: str
    config: dict[str, Any]
    metadata: dict[str, Any]
    metrics: dict[str, Any] | None
    path: Path
    manifest: Manifest | None
    format_version: int

    @property
    def legacy(self) -> bool:
        return self.manifest is None

    @property
    def digest(self) -> str | None:
        """sha256 (hex) of ``manifest.json``: identifies every byte of the artifact (None for legacy)."""
        return self.manifest.digest if self.manifest is not None else None

    @property
    def files(self) -> list[str]:
        """Names of the files (the manifest's, sorted), without ``manifest.json``."""
        if self.manifest is None:
            return sorted(n for n in (CONFIG, TENSORS, METRICS) if (self.path / n).is_file())
        return sorted(self.manifest.files)

    def read_bytes(self, name: str) -> bytes:
        """The bytes of file ``name``, checked against the manifest (ArtifactIntegrityError if they differ)."""
        if self.manifest is None:
            return _read_plain(self.path, name)
        if name not in self.manifest.files:
            raise ArtifactError(f"artifact {self.path} has no file {name!r}; it has {self.files}")
        return _read_verified(self.path, name, self.manifest.files[name])

    def read_json(self, name: str) -> dict[str, Any]:
        """File ``name`` parsed as a JSON object (verified first)."""
        return _json_object(self.path, name, self.read_bytes(name))

    def read_tensors(self, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The safetensors file ``name`` (verified first) as tensors on ``device``."""
        dev = check_device(device, "device")
        data = self.read_bytes(name)
        try:
            tensors = load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:  # a bad header or truncated data
            raise ArtifactError(f"{self.path / name} is not a readable safetensors file: {exc}") from exc
        return {k: v.to(dev) for k, v in tensors.items()} if dev.type != "cpu" else tensors

    def tensors(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The artifact's tensors (``model.safetensors``) on ``device``."""
        return self.read_tensors(TENSORS, device)


def _read_plain(folder: Path, name: str) -> bytes:
    path = folder / name
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    return path.read_bytes()


def _read_verified(folder: Path, name: str, entry: FileEntry) -> bytes:
    path = folder / name
    if path.is_symlink() or not path.is_file():
        raise ArtifactIntegrityError(str(folder), [(name, "is listed in the manifest but missing", entry.sha256, None)])
    data = path.read_bytes()
    bad = _mismatch(name, entry, _sha256(data), len(data))
    if bad:
        raise ArtifactIntegrityError(str(folder), [bad])
    return data


def _legacy_doc(folder: Path) -> dict[str, Any] | None:
    """config.json of a format v1 folder, or None when the folder is not one."""
    cfg = folder / CONFIG
    if not cfg.is_file():
        return None
    try:
        doc = json.loads(cfg.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(doc, dict) and doc.get("format") in LEGACY_FORMATS and doc.get("format_version") == 1:
        return doc
    return None


def _read_legacy(folder: Path, doc: dict[str, Any], kind: str | None) -> Artifact:
    if not (folder / TENSORS).is_file():
        raise ArtifactError(f"{folder} has no {TENSORS}")
    art_kind = LEGACY_FORMATS[doc["format"]]
    if kind is not None and art_kind != kind:
        raise ArtifactError(f"{folder} holds a {art_kind!r} artifact, expected {kind!r}")
    config = _field(folder, CONFIG, doc, "config", dict)
    metadata = doc.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ArtifactError(f"{folder / CONFIG}: 'metadata' must be a JSON object, got {describe(metadata)}")
    metrics = _json_object(folder, METRICS, (folder / METRICS).read_bytes()) if (folder / METRICS).is_file() else None
    warnings.warn(f"{folder} is a format v1 folder without a manifest: its files were not verified. Upgrade it "
                  "with vaekit.artifact.upgrade_legacy(folder) (or save the model again)",
                  LegacyArtifactWarning, stacklevel=3)
    return Artifact(art_kind, config, metadata, metrics, folder, None, 1)


def read_artifact(folder: str | os.PathLike, kind: str | None = None, *, allow_legacy: bool = False) -> Artifact:
    """Verify the artifact at ``folder`` (see :func:`verify_artifact`) and read its JSON parts.

    ``kind`` (when given) must match the artifact's. ``allow_legacy`` reads a format v1 folder
    (no manifest) unverified, with a LegacyArtifactWarning; without it such a folder is an
    ArtifactError telling how to upgrade it. Raises ArtifactIntegrityError or ArtifactError.
    """
    folder = Path(folder)
    if kind is not None:
        _check_kind(kind)
    if allow_legacy and not (folder / MANIFEST).exists():
        doc = _legacy_doc(folder)
        if doc is not None:
            return _read_legacy(folder, doc, kind)
    manifest = verify_artifact(folder)
    doc = _json_object(folder, CONFIG, _read_verified(folder, CONFIG, manifest.files[CONFIG]))
    if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{folder / CONFIG}: format {doc.get('format')!r} v{doc.get('format_version')!r}, "
                            f"expected {FORMAT!r} v{FORMAT_VERSION}")
    art_kind = _field(folder, CONFIG, doc, "kind", str)
    if art_kind != manifest.kind:
        raise ArtifactError(f"{folder}: config.json says kind {art_kind!r}, the manifest {manifest.kind!r}")
    if kind is not None and art_kind != kind:
        raise ArtifactError(f"{folder} holds a {art_kind!r} artifact, expected {kind!r}")
    config = _field(folder, CONFIG, doc, "config", dict)
    metadata = _field(folder, CONFIG, doc, "metadata", dict)
    metrics = None
    if METRICS in manifest.files:
        metrics = _json_object(folder, METRICS, _read_verified(folder, METRICS, manifest.files[METRICS]))
    return Artifact(art_kind, config, metadata, metrics, folder, manifest, FORMAT_VERSION)


# -- writing ---------------------------------------------------------------------------------------
def _json_bytes(name: str, value: Any) -> bytes:
    try:
        return (json.dumps(value, indent=2) + "\n").encode()
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be plain JSON data (dicts, lists, str, numbers, bools, None): {exc}") from exc


def _tensor_bytes(tensors: Any, kind: str) -> bytes:
    if not isinstance(tensors, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in tensors.items()):
        raise InputError(f"tensors must be a mapping of str to torch.Tensor, got {describe(tensors)}")
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    try:
        return save_safetensors(state, metadata={"kind": kind})
    except (ValueError, RuntimeError) as exc:  # shared storage, an unsupported dtype
        raise InputError(f"tensors cannot be stored as safetensors: {exc}") from exc


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # the folder rename is atomic; the files must be on disk before it


def _check_target(folder: Path) -> None:
    """Refuse to replace something that is not an artifact (atomic_folder swaps the whole folder)."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"folder {folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MANIFEST).is_file() \
            and not (folder / CONFIG).is_file():
        raise InputError(f"folder {folder} is not empty and holds no artifact; refusing to replace it "
                         "(choose an empty or new folder)")


def write_artifact(
    folder: str | os.PathLike,
    kind: str,
    config: dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    metadata: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    *,
    files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write an artifact folder atomically and return its path.

    ``kind`` names what it holds (``model``, ``fid-extractor``); ``config`` and ``metadata`` go to
    ``config.json``, ``tensors`` (CPU copies are taken) to ``model.safetensors``, ``metrics`` (when
    not None) to ``metrics.json``; ``files`` adds extra files by relative name (e.g.
    ``profile/profile.json``). ``manifest.json`` records the sha256 and size of every one. An
    existing artifact at ``folder`` is replaced only once the new one is complete; a non-empty
    folder that holds no artifact is refused (InputError).
    """
    folder = Path(folder)
    _check_kind(kind)
    if not isinstance(config, dict):
        raise InputError(f"config must be a dict, got {describe(config)}")
    if metadata is not None and not isinstance(metadata, dict):
        raise InputError(f"metadata must be a dict or None, got {describe(metadata)}")
    if metrics is not None and not isinstance(metrics, dict):
        raise InputError(f"metrics must be a dict or None, got {describe(metrics)}")
    if files is not None and not isinstance(files, Mapping):
        raise InputError(f"files must be a mapping of name to bytes, got {describe(files)}")
    payload = {CONFIG: _json_bytes("config and metadata", {"format": FORMAT, "format_version": FORMAT_VERSION,
                                                           "kind": kind, "config": config,
                                                           "metadata": metadata or {}}),
               TENSORS: _tensor_bytes(tensors, kind)}
    if metrics is not None:
        payload[METRICS] = _json_bytes("metrics", metrics)
    for name, data in (files or {}).items():
        if not isinstance(data, bytes | bytearray):
            raise InputError(f"files[{name!r}] must be bytes, got {type(data).__name__}")
        payload[_check_name(name)] = bytes(data)
    manifest = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "kind": kind, "algorithm": "sha256",
                "files": {n: {"sha256": _sha256(d), "size": len(d)} for n, d in sorted(payload.items())}}
    manifest["self_sha256"] = _canonical_sha256(manifest)
    _check_target(folder)
    with atomic_folder(folder) as tmp:
        for name, data in payload.items():
            _write_file(tmp / name, data)
        _write_file(tmp / MANIFEST, _json_bytes("manifest", manifest))  # last: it vouches for the rest
    return folder


def rewrite_artifact(
    src: str | os.PathLike,
    dst: str | os.PathLike | None = None,
    *,
    metadata: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    files: Mapping[str, bytes | None] | None = None,
) -> Path:
    """Verify the artifact at ``src`` and write it again at ``dst`` (default: in place, atomically)
    with ``metadata`` and/or ``metrics`` replaced and ``files`` added (a None value removes that
    extra file). Everything else is carried over byte for byte after verification."""
    art = read_artifact(src)
    assert art.manifest is not None  # read_artifact without allow_legacy never returns a legacy one
    extra: dict[str, bytes] = {n: art.read_bytes(n) for n in art.manifest.files if n not in RESERVED}
    for name, data in (files or {}).items():
        if data is None:
            extra.pop(_check_name(name), None)
        else:
            extra[name] = data
    return write_artifact(dst if dst is not None else src, art.kind, art.config, art.tensors(),
                          art.metadata if metadata is None else metadata,
                          art.metrics if metrics is None else metrics, files=extra)


def update_metrics(folder: str | os.PathLike, metrics: dict[str, Any]) -> Path:
    """Replace ``metrics.json`` of the artifact at ``folder`` (verified first; rewritten atomically)."""
    if not isinstance(metrics, dict):
        raise InputError(f"metrics must be a dict, got {describe(metrics)}")
    return rewrite_artifact(folder, metrics=metrics)


def upgrade_legacy(folder: str | os.PathLike) -> Path:
    """Rewrite a format v1 folder (no manifest) in the current format, in place.

    Its config.json, model.safetensors and metrics.json are carried over (the tensors are parsed,
    so a truncated file fails here); the hashes recorded are of the files as they are now, so
    upgrade only folders you trust, and load the result once to check it. Cached FID statistics
    (``stats-*.safetensors``, now kept in the vaekit cache) are dropped; any other file is an
    ArtifactError (move it out first). An artifact already current is left as it is.
    """
    folder = Path(folder)
    if (folder / MANIFEST).exists():
        verify_artifact(folder)
        return folder
    doc = _legacy_doc(folder)
    if doc is None:
        raise ArtifactError(f"{folder} is neither a vaekit artifact nor a format v1 model or extractor folder")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LegacyArtifactWarning)
        art = _read_legacy(folder, doc, None)
    present, problems = _present_files(folder)
    others = sorted(n for n in present if n not in (CONFIG, TENSORS, METRICS)
                    and not (art.kind == "fid-extractor" and re.fullmatch(r"stats-[^/]+\.safetensors", n)))
    if problems or others:
        raise ArtifactError(f"{folder} holds files that are not part of a v1 artifact: "
                            f"{others + [p[0] for p in problems]}; move them out and upgrade again")
    return write_artifact(folder, art.kind, art.config, art.tensors(), art.metadata, art.metrics)


# -- helpers for kinds that rebuild a module from an artifact ----------------------------------------
def check_device(device: Any, name: str = "map_location") -> torch.device:
    """``device`` as a torch.device that exists on this machine; ModelFormatError naming it otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelFormatError(f"{name} must be a device such as 'cpu' or 'cuda:0', got {describe(device)}") from exc
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n and (dev.index is None or dev.index < n):
            return dev
        have = f"cuda:0 to cuda:{n - 1}" if n else "no CUDA device"
        raise ModelFormatError(f"{name} {describe(device)} does not exist on this machine ({have}); use 'cpu'")
    if dev.type == "mps" and torch.backends.mps.is_available():
        return dev
    raise ModelFormatError(f"{name} {describe(device)} is not available here; use 'cpu' or a CUDA device")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # compiles string annotations each call: once per class is enough


def _missing_fields(cls: type, data: dict[str, Any], prefix: str) -> list[str]:
    hints = _hints(cls)
    missing = []
    for f in dataclasses.fields(cls):
        if f.name not in data:
            missing.append(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]) and isinstance(data[f.name], dict):
            missing += _missing_fields(hints[f.name], data[f.name], f"{prefix}{f.name}.")
    return missing


def config_from_artifact(cls: type[T], artifact: Artifact, data: dict[str, Any] | None = None) -> T:
    """Config dataclass ``cls`` from a saved config (``artifact.config`` unless ``data`` is given).

    Strict, unlike configs a user writes: every field must be present (a default is never filled
    in for a saved model: it could silently change what the weights compute), no unknown field,
    every value of its field's type. ModelFormatError naming the file and the field otherwise.
    """
    data = artifact.config if data is None else data
    where = artifact.path / CONFIG
    missing = _missing_fields(cls, data, "config.")
    if missing:
        raise ModelFormatError(f"{where}: missing field(s) {missing} of {cls.__name__}; a saved config must "
                               "hold every field (defaults are not filled in)")
    try:
        return from_dict(cls, data, prefix="config.")
    except ConfigError as exc:
        raise ModelFormatError(f"{where}: {exc}") from exc


def load_module_state(module: nn.Module, artifact: Artifact, device: str | torch.device = "cpu") -> nn.Module:
    """Load ``artifact.tensors()`` into ``module`` (exactly its state: same names, shapes and dtypes)
    and move it to ``device``. ModelFormatError naming the file and each tensor that differs."""
    dev = check_device(device)
    state = artifact.tensors()
    want = module.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = [f"{k}: {tuple(state[k].shape)} {state[k].dtype}, the config needs {tuple(v.shape)} {v.dtype}"
             for k, v in want.items() if k in state and (state[k].shape != v.shape or state[k].dtype != v.dtype)]
    if missing or unexpected or wrong:
        parts = [f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "",
                 f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}" if unexpected else "",
                 f"wrong shape or dtype: {'; '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}" if wrong else ""]
        raise ModelFormatError(f"{artifact.path / TENSORS}: the weights do not match the config "
                               f"({', '.join(p for p in parts if p)})")
    module.load_state_dict(state, strict=True)
    return module.to(dev)


__all__ = [
    "Artifact", "FileEntry", "Manifest", "check_device", "config_from_artifact", "load_module_state",
    "read_artifact", "rewrite_artifact", "update_metrics", "upgrade_legacy", "verify_artifact", "write_artifact",
]
