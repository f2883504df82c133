"""Typed exceptions raised by vaekit's public API.

Every message names the argument, the value received and what is allowed, so a
user can fix the call without reading the source.
"""

from __future__ import annotations

from typing import Any


class VaekitError(Exception):
    """Base class of every error vaekit raises on purpose."""


class ConfigError(VaekitError, ValueError):
    """A configuration value or key is invalid (unknown key, wrong type, out of range)."""


class InputError(VaekitError, ValueError):
    """An argument passed to a public function is invalid (shape, dtype, range)."""


class DataError(VaekitError, RuntimeError):
    """A dataset could not be obtained or read."""


class ChecksumError(DataError):
    """A data file's hash differs from the expected one; the file was not used."""

    def __init__(self, path: str, expected: str, actual: str, removed: bool):
        self.path, self.expected, self.actual, self.removed = path, expected, actual, removed
        note = " The file was removed from the cache." if removed else " The file was not used."
        super().__init__(f"checksum mismatch for {path}: expected md5 {expected}, got {actual}.{note}")


class ModelFormatError(VaekitError, ValueError):
    """A saved model folder is missing files or holds an unknown model family."""


class ArtifactError(ModelFormatError):
    """A folder is not a readable vaekit artifact: no manifest, a file that is not valid JSON or
    safetensors, a missing key, an unknown kind or format version."""


class ArtifactIntegrityError(ArtifactError):
    """An artifact's files differ from its manifest (a hash or size mismatch, a missing or an extra file).

    ``problems`` lists every ``(file, problem, expected, actual)`` found; ``file``, ``expected`` and
    ``actual`` repeat the first one (``expected``/``actual`` are sha256 hex digests for a content
    mismatch, None for a missing or extra file).
    """

    def __init__(self, folder: str, problems: list[tuple[str, str, str | None, str | None]]):
        self.folder, self.problems = folder, problems
        self.file, _, self.expected, self.actual = problems[0]
        details = "; ".join(f"{name}: {problem}" for name, problem, _, _ in problems)
        super().__init__(f"artifact {folder} failed verification ({len(problems)} problem(s)): {details}")


class LegacyArtifactWarning(UserWarning):
    """A folder written before artifacts had a manifest (format v1) was loaded without verifying its files."""


class CheckpointError(VaekitError, RuntimeError):
    """A checkpoint could not be written, read or does not match the run."""


class RegistryError(VaekitError, RuntimeError):
    """A registry operation was refused (newer schema, an aliased version deleted, a conflicting change)."""


class RegistryLookupError(RegistryError, LookupError):
    """A registered model, version or alias does not exist."""


class TrainingDivergedError(VaekitError, FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""

    def __init__(self, step: int, values: dict[str, float], last_checkpoint: str | None):
        self.step, self.values, self.last_checkpoint = step, values, last_checkpoint
        where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        terms = ", ".join(f"{k}={v}" for k, v in values.items())
        super().__init__(f"non-finite loss at step {step} ({terms}); training stopped; {where}")


class RunLockedError(CheckpointError):
    """Another live process is training into the same run folder (it holds the folder's lock)."""

    def __init__(self, run_dir: str, holder: dict[str, Any]):
        self.run_dir, self.holder = run_dir, holder
        who = ", ".join(f"{k} {holder[k]}" for k in ("pid", "host", "started", "command") if holder.get(k))
        super().__init__(f"{run_dir} is being trained by another process ({who or 'holder unknown'}); "
                         f"wait for it to finish, stop it, or train into another folder (--set name=...)")


class StorageError(VaekitError, OSError):
    """A file or folder could not be written (no space left, read-only, permission denied, not a folder).

    ``errno`` and ``filename`` are those of the OS error; the message starts with the OS reason."""

    def __init__(self, message: str, errno: int | None = None, filename: str | None = None):
        super().__init__(message)
        self.message = message
        self.errno, self.filename = errno, filename

    def __str__(self) -> str:  # OSError's own would print "[Errno N] strerror: filename"
        return self.message


class UnsupportedModelError(VaekitError, TypeError):
    """A function needs a model capability (a class-level flag) that this model's family lacks."""


class NotFittedError(VaekitError, AttributeError):
    """A fitted object (score statistics, detector, threshold, drift test) was used before ``fit``."""


def describe(value: Any) -> str:
    """Short repr of a user value for error messages (long values are cut)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_choice(name: str, value: Any, allowed: tuple | list) -> None:
    """Raise ConfigError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {describe(value)}")


def check_positive(name: str, value: Any, *, allow_zero: bool = False, integer: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a (strictly) positive number (an int if ``integer``)."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        need = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {need}, got {describe(value)}")
    if value < 0 or (value == 0 and not allow_zero) or value != value:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be {bound}, got {describe(value)}")


def check_share(name: str, share: Any) -> float:
    """``share`` as a float in [0, 1] (a share of traffic or of requests); ConfigError otherwise."""
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0.0 <= share <= 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1], got {describe(share)}")
    return float(share)


def finite_array(name: str, value: Any, ndim: int, *, min_rows: int = 1) -> Any:
    """``value`` (a sequence, numpy array or torch tensor) as a float64 numpy array of ``ndim``
    dimensions with at least ``min_rows`` rows and only finite values; InputError naming ``name``,
    the shape received and the count of NaN/inf values otherwise."""
    import numpy as np

    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().double().numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != ndim or arr.shape[0] < min_rows:
        shape = "(N, D)" if ndim == 2 else "(N,)"
        raise InputError(f"{name} must be an array {shape} with N >= {min_rows}, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"{name} must be finite, got {int((~np.isfinite(arr)).sum())} NaN/inf value(s)")
    return arr


class WebhookError(VaekitError, RuntimeError):
    """A webhook alert sink gave up: every attempt failed (the last status or error is in the message)."""
