"""Typed configuration helpers shared by every config dataclass.

A config is a dataclass whose fields carry defaults; :func:`from_dict` builds one
from plain data (JSON/YAML), rejecting unknown keys and coercing or rejecting
values by the field's type hint. ``--set key=value`` overrides are parsed by
:func:`parse_override` and applied with :func:`set_by_path`.

YAML is read with :class:`ConfigLoader`, PyYAML's safe loader with three YAML 1.1 surprises
taken out: ``1e-3`` is a number (PyYAML reads it as text), and ``010`` (octal 8 in YAML 1.1),
``1:30`` (sexagesimal 90) and ``2024-01-01`` (a date) stay text, so a number field reports them
instead of taking a value the user did not write. ``yes``/``no``/``on``/``off`` stay booleans.
:func:`load_yaml` also keeps the source text of every plain scalar, used only by
:func:`annotate_error` to show what the user wrote when YAML read it as another type.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from vaekit.errors import ConfigError, describe

T = TypeVar("T")


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with decimal integers only, exponent floats without a dot, no dates."""


ConfigLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                                                    "tag:yaml.org,2002:timestamp")]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+|[-+]?0b[01_]+)$"), list("-+0123456789"))
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?)|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))

# Where each plain scalar of a config came from: dotted path -> (text as written, where, tag).
Sources = dict[str, tuple[str, str, str]]


def _walk(node: yaml.Node, path: str, where: str, out: Sources) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = str(k.value)
            _walk(v, f"{path}.{key}" if path else key, where, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _walk(v, f"{path}[{i}]", where, out)
    elif isinstance(node, yaml.ScalarNode) and not node.style:  # quoted text is what the user meant
        out[path] = (node.value, f"{where} line {node.start_mark.line + 1}", node.tag.rsplit(":", 1)[-1])


def load_yaml(text: str, where: str = "") -> tuple[Any, Sources]:
    """(data, sources) of a YAML document read with :class:`ConfigLoader`; ``sources`` maps the
    dotted path of each plain scalar to (its text, ``where`` + line, the type YAML gave it)."""
    loader = ConfigLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    sources: Sources = {}
    if node is not None:
        _walk(node, "", where, sources)
    return data, sources


_NUMBERISH = re.compile(r"^[-+]?[0-9][0-9_:.\-]*$")


def _surprise(text: str, tag: str) -> str | None:
    """How YAML's reading of a plain scalar differs from what its text suggests (None: it does not)."""
    low = text.lower()
    if tag == "bool" and low not in ("true", "false"):
        return f"YAML reads {text} as the boolean {low in ('yes', 'y', 'on')}: quote it ('{text}') to mean the text"
    if tag == "null" and low not in ("null",):
        return "YAML reads it as null (no value)"
    if tag == "str" and _NUMBERISH.match(text):
        if re.fullmatch(r"[-+]?0[0-9_]+", text):
            return "YAML 1.1 would read a leading zero as octal, vaekit keeps it as text: write the number without it"
        return "YAML reads it as text, not a number"
    if tag == "int" and low.lstrip("+-").startswith(("0x", "0b")):
        return f"YAML reads it as the integer {int(text.replace('_', ''), 0)}"
    return None


def annotate_error(message: str, sources: Sources) -> str:
    """``message`` plus, for each config key it names whose value YAML read as another type than its
    text suggests (``yes`` -> true, ``1e-3`` -> text in PyYAML, ``010``), what the user wrote and where."""
    notes = []
    for path, (text, where, tag) in sources.items():
        if not re.search(rf"(?<![\w.]){re.escape(path)}(?![\w\[])", message):
            continue
        why = _surprise(text, tag)
        if why:
            notes.append(f"{path}: you wrote {text} ({where}); {why}")
    return message + "".join(f"\n  note: {n}" for n in notes)


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Return ``value`` converted to ``hint`` or raise ConfigError naming ``name``."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{name}: {describe(value)} matches none of {hint}: " + "; ".join(errors))
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {list(allowed)}, got {describe(value)}")
        return value
    if origin is tuple:
        args = get_args(hint)
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ConfigError(f"{name} must be a list, got {describe(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{name} must have {len(args)} items, got {describe(value)}")
        return tuple(_coerce(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {describe(value)}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return from_dict(hint, value, prefix=name + ".")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {describe(value)}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name} must be an integer, got {describe(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number, got {describe(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {describe(value)}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__} must be a mapping, got {describe(data)}")
    hints = typing.get_type_hints(cls)
    names = field_names(cls)
    unknown = sorted(set(data) - set(names))
    if unknown:
        valid = ", ".join(prefix + n for n in names)
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys: {valid}")
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-data view of a config (tuples become lists) suitable for JSON/YAML."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(config)


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is read as YAML by :class:`ConfigLoader` (so ``1e-3``, ``true``,
    ``[1,2]`` are typed; ``010`` stays text)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {describe(text)}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {describe(text)}")
    try:
        value = load_yaml(raw)[0] if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_by_path(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``key='a.b'``, creating mappings on the way."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def validate(config: Any) -> None:
    """Re-run a config's ``__post_init__`` checks after fields were changed in place."""
    post = getattr(config, "__post_init__", None)
    if post is not None:
        post()
