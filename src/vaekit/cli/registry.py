"""``vaekit registry ...``: register models, list and show versions, move aliases, roll back, read the history.

The registry is ``--registry URI``, else ``$VAEKIT_REGISTRY``, else ``sqlite:///registry/registry.db`` (under the
working directory). Every verb prints a human-readable summary, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from vaekit.cli.common import db_errors_as
from vaekit.errors import InputError, RegistryError
from vaekit.registry import DEFAULT_URI, ModelRegistry, Version, parse_ref


def add_parser(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", metavar="URI",
                        help=f"sqlite:///PATH or postgresql://... (default: $VAEKIT_REGISTRY, else {DEFAULT_URI})")
    common.add_argument("--artifacts", metavar="DIR",
                        help="artifact folder (default: $VAEKIT_REGISTRY_ARTIFACTS, else the one the registry "
                             "recorded, else beside a SQLite file); a PostgreSQL registry needs a shared one")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser("registry", help="versioned models with lineage, aliases, history and rollback")
    verbs = p.add_subparsers(dest="verb", required=True)

    r = verbs.add_parser("register", parents=[common], help="register a run or model folder as a new version")
    r.add_argument("source", metavar="RUN_OR_MODEL", help="run folder (with model/) or model folder")
    r.add_argument("--name", required=True, help="the model's name in the registry")
    r.add_argument("--alias", help="point this alias (e.g. production) at the new version")
    r.add_argument("--reason", help="why (kept in the alias history; default: 'registered NAME/V')")
    r.add_argument("--parent", metavar="REF", help="the version this one was fine-tuned from (NAME/V, NAME@ALIAS)")
    r.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="a tag (repeatable)")
    r.add_argument("--description", help="a free-text description")
    r.add_argument("--profile-data", metavar="SPEC",
                   help="held-out images for the monitoring reference profile: 'validation' (the run's "
                        "data.validation hold-out, the default when the run has one) or 'DATASET:test' "
                        "(e.g. mnist:test); never a training split")
    r.add_argument("--no-profile", action="store_true", help="register without a reference profile")
    r.set_defaults(func=_one_line_db_errors(register))

    ls = verbs.add_parser("list", parents=[common], help="registered models, or the versions of one")
    ls.add_argument("name", nargs="?", help="list this model's versions")
    ls.add_argument("--deleted", action="store_true", help="include deleted versions")
    ls.set_defaults(func=_one_line_db_errors(list_))

    s = verbs.add_parser("show", parents=[common], help="one version and its lineage")
    s.add_argument("ref", metavar="NAME[/V|@ALIAS]")
    s.set_defaults(func=_one_line_db_errors(show))

    a = verbs.add_parser("alias", parents=[common], help="point an alias at a version (recorded in its history)")
    a.add_argument("name")
    a.add_argument("alias")
    a.add_argument("version", type=int)
    a.add_argument("--reason", required=True, help="why (kept in the alias history)")
    a.set_defaults(func=_one_line_db_errors(alias))

    rb = verbs.add_parser("rollback", parents=[common], help="move an alias back to its previous holder")
    rb.add_argument("name")
    rb.add_argument("alias")
    rb.add_argument("--reason", required=True, help="why (kept in the alias history)")
    rb.set_defaults(func=_one_line_db_errors(rollback))

    h = verbs.add_parser("history", parents=[common], help="every alias move of a model (or of one alias)")
    h.add_argument("name")
    h.add_argument("alias", nargs="?")
    h.set_defaults(func=_one_line_db_errors(history))

    v = verbs.add_parser("verify", parents=[common], help="re-hash a version's stored artifact")
    v.add_argument("ref", metavar="NAME/V")
    v.set_defaults(func=_one_line_db_errors(verify))

    d = verbs.add_parser("delete", parents=[common], help="delete a version (refused while an alias points at it)")
    d.add_argument("ref", metavar="NAME/V")
    d.add_argument("--reason", required=True)
    d.set_defaults(func=_one_line_db_errors(delete))

    g = verbs.add_parser("gc", parents=[common], help="remove artifact folders no live version uses")
    g.add_argument("--min-age", type=float, default=3600.0, metavar="SECONDS",
                   help="only folders older than this (default 3600: spares registrations in flight)")
    g.add_argument("--dry-run", action="store_true", help="list what would go, remove nothing")
    g.set_defaults(func=_one_line_db_errors(gc))


def _open(args: argparse.Namespace) -> ModelRegistry:
    return ModelRegistry(args.registry, artifact_root=args.artifacts)


_one_line_db_errors = db_errors_as(RegistryError)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=False) if args.json else text)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _short(text: str | None, n: int = 12) -> str:
    return "-" if text is None else text[:n]


def _describe(v: Version) -> str:
    rows: list[tuple[str, Any]] = [
        ("version", v.ref), ("family", v.family), ("aliases", ", ".join(v.aliases) or "-"),
        ("created", f"{v.created_at} by {v.created_by} (vaekit {v.vaekit_version})"),
        ("artifact", v.artifact_path), ("artifact sha256", v.artifact_hash), ("source", v.source),
        ("run", v.run_dir), ("run config sha256", v.run_config_hash),
        ("config revisions", len(v.run_config_revisions) if v.run_config_revisions else "one config all along"
         if v.run_config else None),
        ("data fingerprint", v.data_fingerprint),
        ("parent", v.parent), ("description", v.description),
        ("reference profile", v.profile_data or "none (no held-out images given)"),
        ("tags", ", ".join(f"{k}={t}" for k, t in sorted(v.tags.items())) or "-"),
    ]
    if v.data:
        rows.append(("data", ", ".join(f"{k}={v.data[k]}" for k in ("dataset", "train_subset", "validation")
                                       if v.data.get(k) is not None)))
    test = (v.metrics or {}).get("test") or {}
    if test:
        rows.append(("test metrics", ", ".join(f"{k}={val:.4f}" for k, val in test.items()
                                               if isinstance(val, float))))
    if v.deleted_at:
        rows.append(("deleted", f"{v.deleted_at} by {v.deleted_by}: {v.deleted_reason}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {'-' if val is None else val}" for k, val in rows)


def _tags(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--tag must be KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def register(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        v = reg.register(args.source, args.name, alias=args.alias, reason=args.reason, parent=args.parent,
                         tags=_tags(args.tag), description=args.description, profile=not args.no_profile,
                         profile_data=args.profile_data)
    where = f" ({', '.join(f'@{a}' for a in v.aliases)})" if v.aliases else ""
    _emit(args, v.to_dict(), f"registered {v.ref}{where}\n{_describe(v)}")
    return 0


def list_(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        if args.name is None:
            models = reg.models()
            rows = [[m.name, str(m.versions), str(m.latest or "-"),
                     ", ".join(f"{a}={n}" for a, n in sorted(m.aliases.items())) or "-"] for m in models]
            _emit(args, [m.to_dict() for m in models],
                  _table(["name", "versions", "latest", "aliases"], rows) if rows else "no models registered")
            return 0
        versions = reg.versions(args.name, include_deleted=args.deleted)
    rows = [[v.ref, v.family or "-", v.created_at, v.created_by, ", ".join(v.aliases) or "-",
             _short(v.artifact_hash), "deleted" if v.deleted_at else ""] for v in versions]
    _emit(args, [v.to_dict() for v in versions],
          _table(["version", "family", "created", "by", "aliases", "artifact", ""], rows))
    return 0


def show(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        v = reg.get(args.ref, include_deleted=True)
    _emit(args, v.to_dict(), _describe(v))
    return 0


def alias(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        event = reg.set_alias(args.name, args.alias, args.version, args.reason)
    if event is None:
        _emit(args, None, f"{args.name}@{args.alias} already points at version {args.version}; nothing recorded")
        return 0
    _emit(args, event.to_dict(), f"{args.name}@{args.alias}: {event.from_version or '(unset)'} -> "
                                 f"{event.to_version} ({event.reason})")
    return 0


def rollback(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        event = reg.rollback(args.name, args.alias, args.reason)
    _emit(args, event.to_dict(), f"{args.name}@{args.alias} rolled back: {event.from_version} -> "
                                 f"{event.to_version} ({event.reason})")
    return 0


def history(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        events = reg.history(args.name, args.alias)
    rows = [[str(e.id), e.at, e.alias, e.action, str(e.from_version or "-"), str(e.to_version or "-"), e.actor,
             e.reason] for e in events]
    _emit(args, [e.to_dict() for e in events],
          _table(["#", "at", "alias", "action", "from", "to", "actor", "reason"], rows) if rows
          else f"no alias moves recorded for {args.name}{'@' + args.alias if args.alias else ''}")
    return 0


def verify(args: argparse.Namespace) -> int:
    ref = parse_ref(args.ref)
    if ref.version is None:
        raise InputError(f"verify needs NAME/VERSION, got {args.ref!r}")
    with _open(args) as reg:
        v = reg.verify(ref)
    _emit(args, {"ref": v.ref, "ok": True, "artifact": str(v.artifact_path), "sha256": v.artifact_hash},
          f"{v.ref}: ok (artifact {v.artifact_path}, sha256 {v.artifact_hash})")
    return 0


def delete(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        v = reg.delete(args.ref, args.reason)
    _emit(args, v.to_dict(), f"deleted {v.ref} ({v.deleted_reason})")
    return 0


def gc(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        removed = reg.gc(min_age_s=args.min_age, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    _emit(args, [str(p) for p in removed], "\n".join(f"{verb} {p}" for p in removed) or "nothing to remove")
    return 0
