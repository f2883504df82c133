"""References to registered versions: ``name`` (the latest), ``name/3`` (version 3), ``name@production`` (an alias)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from vaekit.errors import InputError, describe

# Names and aliases: a letter or digit first, then letters, digits, '.', '_' or '-'; no '/' or '@' (they separate
# the parts of a reference), at most 128 characters.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RESERVED_ALIASES = ("latest",)  # `name` alone already means the latest version


@dataclass(frozen=True)
class Ref:
    """A parsed reference: exactly one of ``version`` and ``alias`` is set, or neither (the latest version)."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}/{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def check_name(name: object, what: str = "name") -> str:
    """``name`` if it is a valid model name; InputError naming ``what`` otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InputError(f"{what} must be 1-128 characters of letters, digits, '.', '_' or '-' starting with a "
                         f"letter or digit, got {describe(name)}")
    return name


def check_alias(alias: object, what: str = "alias") -> str:
    """``alias`` if it is a valid alias name (any name but all digits and 'latest'); InputError otherwise."""
    check_name(alias, what)
    assert isinstance(alias, str)
    if alias.isdigit():
        raise InputError(f"{what} must not be all digits (it would read as a version number), got {alias!r}")
    if alias in RESERVED_ALIASES:
        raise InputError(f"{what} {alias!r} is reserved: a bare model name already means its latest version")
    return alias


def check_version(version: object, what: str = "version") -> int:
    """``version`` as an int >= 1 (a digit string is accepted); InputError otherwise."""
    if isinstance(version, str) and version.isdigit():
        version = int(version)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InputError(f"{what} must be a version number >= 1, got {describe(version)}")
    return version


def parse_ref(ref: object) -> Ref:
    """Parse ``name``, ``name/3`` or ``name@alias`` into a :class:`Ref`.

    Raises InputError naming the reference and the accepted forms when it is none of them.
    """
    forms = "'NAME' (latest), 'NAME/VERSION' or 'NAME@ALIAS'"
    if isinstance(ref, Ref):
        return ref
    if not isinstance(ref, str) or not ref:
        raise InputError(f"ref must be a string {forms}, got {describe(ref)}")
    if "/" in ref and "@" in ref:
        raise InputError(f"ref {ref!r} has both a version and an alias; use one of {forms}")
    try:
        if "/" in ref:
            name, _, version = ref.partition("/")
            if not version.isdigit():
                raise InputError(f"ref {ref!r}: the version after '/' must be a number >= 1, got {version!r}")
            return Ref(check_name(name, f"ref {ref!r}: the name"), version=check_version(version, f"ref {ref!r}"))
        if "@" in ref:
            name, _, alias = ref.partition("@")
            return Ref(check_name(name, f"ref {ref!r}: the name"), alias=check_alias(alias, f"ref {ref!r}: the alias"))
        return Ref(check_name(ref, f"ref {ref!r}: the name"))
    except InputError as exc:
        if forms in str(exc):
            raise
        raise InputError(f"{exc}; accepted forms: {forms}") from None
