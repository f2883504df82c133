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


class CheckpointError(VaekitError, RuntimeError):
    """A checkpoint could not be written, read or does not match the run."""


class TrainingDivergedError(VaekitError, FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""

    def __init__(self, step: int, values: dict[str, float], last_checkpoint: str | None):
        self.step, self.values, self.last_checkpoint = step, values, last_checkpoint
        where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        terms = ", ".join(f"{k}={v}" for k, v in values.items())
        super().__init__(f"non-finite loss at step {step} ({terms}); training stopped; {where}")


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


class NotFittedError(VaekitError, RuntimeError):
    """A detector, gate or threshold fitted on reference data was used before ``fit``."""


class WebhookError(VaekitError, RuntimeError):
    """A webhook alert sink gave up: every attempt failed (the last status or error is in the message)."""
