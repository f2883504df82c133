"""``ModelRegistry``: immutable, numbered versions with lineage; aliases with an append-only history; rollback.

The database (SQLite file or PostgreSQL, through :mod:`vaekit.db`) holds the rows; the artifacts live in a
content-addressed folder (:mod:`vaekit.registry.store`). ``register`` copies the artifact into place first
(atomically) and then inserts the version row in one transaction, so a version is visible only once its artifact
is complete; a registration killed in between leaves at most an unreferenced artifact folder that later
registrations reuse or ``gc`` removes.
"""

from __future__ import annotations

import getpass
import math
import os
import socket
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, inspect, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError

from vaekit.db import make_engine, reader, run_with_retry, sqlite_path
from vaekit.errors import DataError, InputError, RegistryError, RegistryLookupError, describe
from vaekit.registry import schema as S
from vaekit.registry.lineage import canonical_hash, read_source, training_examples
from vaekit.registry.lineage import data_fingerprint as fingerprint_examples
from vaekit.registry.refs import Ref, check_alias, check_name, check_version, parse_ref
from vaekit.registry.store import ArtifactStore

DEFAULT_URI = "sqlite:///registry/registry.db"  # relative to the working directory
ENV_URI = "VAEKIT_REGISTRY"
ENV_ARTIFACTS = "VAEKIT_REGISTRY_ARTIFACTS"


def default_actor() -> str:
    """``user@host`` of this process (the uid when the user has no name, as in some containers)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string with microseconds (sorts as text)."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None: PostgreSQL's json type has no NaN or Infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _one_line(exc: object) -> str:
    """A driver's (often multi-line) message on one line, for the CLI's one-line errors."""
    return " ".join(str(exc).split())


def _check_reason(reason: Any, what: str = "reason") -> str:
    if not isinstance(reason, str) or not reason.strip():
        raise InputError(f"{what} must be a non-empty string saying why (it is kept in the alias history), "
                         f"got {describe(reason)}")
    return reason.strip()


def _check_json(value: Any, what: str) -> Any:
    import json

    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be JSON data (dicts, lists, strings, finite numbers), got "
                         f"{describe(value)} ({exc})") from None
    return value


@dataclass(frozen=True)
class Version:
    """One registered version: immutable apart from its tags (and the aliases pointing at it)."""

    name: str
    version: int
    artifact_path: Path  # the stored artifact folder (absolute)
    artifact_hash: str  # content sha256 of the artifact
    family: str | None
    created_by: str
    created_at: str
    vaekit_version: str
    description: str | None = None
    source: str | None = None
    run_dir: str | None = None
    run_config: dict[str, Any] | None = None
    run_config_hash: str | None = None
    run_config_revisions: list[dict[str, Any]] | None = None  # when the run's config changed mid-run
    data_fingerprint: str | None = None
    data: dict[str, Any] | None = None
    parent: str | None = None  # "name/version" of the version this one was fine-tuned from
    metrics: dict[str, Any] | None = None
    profile_data: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    deleted_at: str | None = None
    deleted_by: str | None = None
    deleted_reason: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["artifact_path"] = str(self.artifact_path)
        d["aliases"] = list(self.aliases)
        d["ref"] = self.ref
        return d


@dataclass(frozen=True)
class AliasEvent:
    """One entry of an alias's history: the alias moved from ``from_version`` to ``to_version`` (None: unset)."""

    id: int
    name: str
    alias: str
    action: str  # set | rollback | remove
    from_version: int | None
    to_version: int | None
    actor: str
    at: str
    reason: str
    evidence: Any = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelSummary:
    """A registered name: how many live versions, the latest, and its aliases (alias -> version)."""

    name: str
    versions: int
    latest: int | None
    aliases: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ModelRegistry:
    """A registry of model versions at ``uri`` (``sqlite:///PATH`` or ``postgresql://...``).

    ``uri`` defaults to ``$VAEKIT_REGISTRY``, else ``sqlite:///registry/registry.db`` (relative to the working
    directory). Artifacts go to ``artifact_root`` (else ``$VAEKIT_REGISTRY_ARTIFACTS``, else the root recorded when
    the registry was first opened with one, else, for SQLite, an ``artifacts`` folder beside the database
    file). A PostgreSQL registry shared by several machines needs a root all of them see (a shared file system).
    ``actor`` (default ``user@host``) is recorded as who registered or moved what.
    """

    def __init__(self, uri: str | None = None, *, artifact_root: str | os.PathLike | None = None,
                 actor: str | None = None):
        self.uri = uri or os.environ.get(ENV_URI) or DEFAULT_URI
        self.engine = make_engine(self.uri)
        self._read = reader(self.engine)  # reads never wait for a SQLite writer
        self.actor = actor or default_actor()
        # the artifact folder first: a PostgreSQL registry without one is refused before any table is created
        root = self._artifact_root(artifact_root)
        self._init_schema(artifact_root)
        self.store = ArtifactStore(root)

    @property
    def _shown(self) -> str:
        """The URL without its password, for messages."""
        return self.engine.url.render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"ModelRegistry({self._shown!r})"

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> ModelRegistry:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- schema and settings -------------------------------------------------------------------------------

    def _init_schema(self, artifact_root: str | os.PathLike | None) -> None:
        shown = self.engine.url.render_as_string(hide_password=True)
        # a root given at creation is recorded once (SQLite too: a later open without it, from another
        # process or the CLI, finds the artifacts where they are, not beside the database)
        want_root = artifact_root is not None

        def state(conn: Connection) -> tuple[int | None, bool, bool]:
            """(schema version or None, every table present, an artifact root recorded)."""
            tables = set(inspect(conn).get_table_names())
            found = None
            if S.schema_table.name in tables:
                found = conn.execute(select(S.schema_table.c.version)).scalar_one_or_none()
            if found is not None and found > S.SCHEMA_VERSION:
                from vaekit import __version__

                raise RegistryError(
                    f"the registry at {shown} has schema version {found}, newer than this vaekit "
                    f"({__version__}) reads (up to {S.SCHEMA_VERSION}); upgrade vaekit to open it")
            complete = set(S.metadata.tables) <= tables
            has_root = complete and conn.execute(select(S.settings.c.value).where(
                S.settings.c.key == "artifact_root")).scalar_one_or_none() is not None
            return found, complete, has_root

        def init() -> None:
            # an existing, current registry is opened with a read only: opening never waits for a writer
            with self._read.connect() as conn:
                found, complete, has_root = state(conn)
            if found == S.SCHEMA_VERSION and complete and (has_root or not want_root):
                return
            with self.engine.begin() as conn:
                found, complete, has_root = state(conn)
                S.metadata.create_all(conn)
                if found is None:
                    from vaekit import __version__

                    conn.execute(insert(S.schema_table).values(id=1, version=S.SCHEMA_VERSION, created_at=utc_now(),
                                                               created_by_vaekit=__version__))
                if want_root and not has_root:
                    assert artifact_root is not None
                    conn.execute(insert(S.settings).values(key="artifact_root",
                                                           value=str(Path(artifact_root).resolve())))

        try:
            # two processes creating the tables at once: one loses the race (duplicate table) and retries
            run_with_retry(init, attempts=6, retryable=lambda e: isinstance(e, DBAPIError))
        except OperationalError as exc:
            raise RegistryError(f"cannot open the registry at {shown}: {_one_line(exc.orig)}") from None

    @property
    def _is_sqlite(self) -> bool:
        return sqlite_path(self.engine.url) is not None

    def _artifact_root(self, artifact_root: str | os.PathLike | None) -> Path:
        if artifact_root is not None:
            return Path(artifact_root).resolve()
        if os.environ.get(ENV_ARTIFACTS):
            return Path(os.environ[ENV_ARTIFACTS]).resolve()
        stored = None
        db = sqlite_path(self.engine.url)
        if db is None or db.is_file():  # a new SQLite file is not created just to read a setting
            try:
                with self._read.connect() as conn:
                    if inspect(conn).has_table(S.settings.name):
                        stored = conn.execute(select(S.settings.c.value).where(
                            S.settings.c.key == "artifact_root")).scalar_one_or_none()
            except OperationalError as exc:
                raise RegistryError(f"cannot open the registry at {self._shown}: {_one_line(exc.orig)}") from None
        if stored:
            return Path(stored)
        if db is not None:
            return db.resolve().parent / "artifacts"
        raise RegistryError(f"the PostgreSQL registry at {self._shown} has no artifact folder recorded: pass "
                            f"artifact_root= (CLI: --artifacts) or set ${ENV_ARTIFACTS} to a folder every machine "
                            "using the registry sees")

    # ---- reading --------------------------------------------------------------------------------------------

    def _version_from_row(self, row: Any, tags: dict[str, str], aliases: Iterable[str]) -> Version:
        m = row._mapping
        parent = f"{m['parent_name']}/{m['parent_version']}" if m["parent_name"] else None
        return Version(
            name=m["name"], version=m["version"], artifact_path=self.store.path(m["artifact_path"]),
            artifact_hash=m["artifact_hash"], family=m["family"], created_by=m["created_by"],
            created_at=m["created_at"], vaekit_version=m["vaekit_version"], description=m["description"],
            source=m["source"], run_dir=m["run_dir"], run_config=m["run_config"],
            run_config_hash=m["run_config_hash"], run_config_revisions=m["run_config_revisions"],
            data_fingerprint=m["data_fingerprint"], data=m["data"],
            parent=parent, metrics=m["metrics"], profile_data=m["profile_data"], tags=tags,
            aliases=tuple(sorted(aliases)), deleted_at=m["deleted_at"], deleted_by=m["deleted_by"],
            deleted_reason=m["deleted_reason"])

    def _versions(self, conn: Connection, where: Any, order_desc: bool = True) -> list[Version]:
        v = S.versions.c
        q = select(S.versions).where(where).order_by(v.name, v.version.desc() if order_desc else v.version)
        rows = conn.execute(q).all()
        if not rows:
            return []
        names = sorted({r.name for r in rows})
        tags: dict[tuple[str, int], dict[str, str]] = {}
        for t in conn.execute(select(S.tags).where(S.tags.c.name.in_(names))):
            tags.setdefault((t.name, t.version), {})[t.key] = t.value
        held: dict[tuple[str, int], list[str]] = {}
        for a in conn.execute(select(S.aliases).where(S.aliases.c.name.in_(names))):
            held.setdefault((a.name, a.version), []).append(a.alias)
        return [self._version_from_row(r, tags.get((r.name, r.version), {}), held.get((r.name, r.version), []))
                for r in rows]

    def _resolve(self, conn: Connection, ref: Ref) -> int:
        """The version number ``ref`` names (RegistryLookupError when there is none)."""
        v = S.versions.c
        if ref.version is not None:
            return ref.version
        if ref.alias is not None:
            held = conn.execute(select(S.aliases.c.version).where(S.aliases.c.name == ref.name,
                                                                  S.aliases.c.alias == ref.alias)).scalar()
            if held is None:
                known = sorted(conn.execute(select(S.aliases.c.alias).where(S.aliases.c.name == ref.name)).scalars())
                self._require_name(conn, ref.name)
                raise RegistryLookupError(f"model {ref.name!r} has no alias {ref.alias!r} (its aliases: "
                                          f"{', '.join(known) or 'none'})")
            return held
        latest = conn.execute(select(func.max(v.version)).where(v.name == ref.name, v.deleted_at.is_(None))).scalar()
        if latest is None:
            self._require_name(conn, ref.name)
            raise RegistryLookupError(f"model {ref.name!r} has no live versions (all were deleted)")
        return latest

    def _require_name(self, conn: Connection, name: str) -> None:
        if conn.execute(select(S.versions.c.id).where(S.versions.c.name == name).limit(1)).first() is None:
            raise RegistryLookupError(f"no model named {name!r} in the registry")

    def get(self, ref: str | Ref, *, include_deleted: bool = False) -> Version:
        """The version ``ref`` names (``name``: the latest live one, ``name/3``, ``name@production``).

        RegistryLookupError when it does not exist (or was deleted, unless ``include_deleted``).
        """
        r = parse_ref(ref)
        with self._read.connect() as conn:
            number = self._resolve(conn, r)
            found = self._versions(conn, (S.versions.c.name == r.name) & (S.versions.c.version == number))
        if not found:
            self._lookup_failure(r, number)
        ver = found[0]
        if ver.deleted_at is not None and not include_deleted:
            raise RegistryLookupError(f"{ver.ref} was deleted at {ver.deleted_at} by {ver.deleted_by}: "
                                      f"{ver.deleted_reason}")
        return ver

    def _lookup_failure(self, r: Ref, number: int) -> None:
        with self._read.connect() as conn:
            self._require_name(conn, r.name)
            latest = conn.execute(select(func.max(S.versions.c.version)).where(S.versions.c.name == r.name)).scalar()
        raise RegistryLookupError(f"model {r.name!r} has no version {number} (versions 1..{latest})")

    def load(self, ref: str | Ref, map_location: str = "cpu") -> Any:
        """The model ``ref`` names, loaded through :func:`vaekit.load_model` (eval mode, on ``map_location``)."""
        from vaekit.models.base import load_model

        return load_model(self.get(ref).artifact_path, map_location=map_location)

    def versions(self, name: str, *, include_deleted: bool = False) -> list[Version]:
        """Every version of ``name``, newest first (deleted ones only with ``include_deleted``).

        RegistryLookupError when nothing was ever registered under ``name`` (a typo, most likely)."""
        check_name(name)
        where = S.versions.c.name == name
        if not include_deleted:
            where = where & S.versions.c.deleted_at.is_(None)
        with self._read.connect() as conn:
            found = self._versions(conn, where)
            if not found:
                self._require_name(conn, name)
            return found

    def models(self) -> list[ModelSummary]:
        """Every registered name with its live version count, latest live version and aliases."""
        v = S.versions.c
        with self._read.connect() as conn:
            rows = conn.execute(select(v.name, func.count(v.id), func.max(v.version))
                                .where(v.deleted_at.is_(None)).group_by(v.name)).all()
            counts = {r[0]: (r[1], r[2]) for r in rows}
            names = sorted(set(counts) | set(conn.execute(select(v.name).distinct()).scalars()))
            held: dict[str, dict[str, int]] = {}
            for a in conn.execute(select(S.aliases)):
                held.setdefault(a.name, {})[a.alias] = a.version
        return [ModelSummary(n, counts.get(n, (0, None))[0], counts.get(n, (0, None))[1], held.get(n, {}))
                for n in names]

    def search(self, *, name: str | None = None, family: str | None = None, tags: Mapping[str, str] | None = None,
               alias: str | None = None, include_deleted: bool = False) -> list[Version]:
        """Versions matching every filter given: ``name`` (a substring of the name), ``family``, ``tags`` (each
        key equal to its value), ``alias`` (the versions holding that alias). Newest first within each name."""
        v = S.versions.c
        where: Any = v.id.is_not(None)
        if name is not None:
            if not isinstance(name, str):
                raise InputError(f"name must be a substring to search for, got {describe(name)}")
            where = where & v.name.contains(name, autoescape=True)
        if family is not None:
            where = where & (v.family == family)
        if not include_deleted:
            where = where & v.deleted_at.is_(None)
        for key, value in (tags or {}).items():
            t = S.tags.c
            where = where & select(t.key).where(t.name == v.name, t.version == v.version, t.key == key,
                                                t.value == str(value)).exists()
        if alias is not None:
            a = S.aliases.c
            where = where & select(a.alias).where(a.name == v.name, a.version == v.version, a.alias == alias).exists()
        with self._read.connect() as conn:
            return self._versions(conn, where)

    def aliases(self, name: str) -> dict[str, int]:
        """``{alias: version}`` for ``name``."""
        check_name(name)
        with self._read.connect() as conn:
            rows = conn.execute(select(S.aliases.c.alias, S.aliases.c.version).where(S.aliases.c.name == name))
            return dict(sorted((r[0], r[1]) for r in rows))

    def history(self, name: str, alias: str | None = None) -> list[AliasEvent]:
        """Every alias move of ``name`` (or of one ``alias``), oldest first. The history is only ever appended to."""
        check_name(name)
        h = S.alias_history.c
        where = h.name == name
        if alias is not None:
            where = where & (h.alias == check_alias(alias))
        with self._read.connect() as conn:
            rows = conn.execute(select(S.alias_history).where(where).order_by(h.id)).all()
        return [AliasEvent(**r._mapping) for r in rows]

    # ---- registering ----------------------------------------------------------------------------------------

    def register(self, source: str | os.PathLike, name: str, *, alias: str | None = None, reason: str | None = None,
                 parent: str | Ref | None = None, tags: Mapping[str, str] | None = None,
                 description: str | None = None, metrics: Mapping[str, Any] | None = None,
                 data_fingerprint: str | None = None, profile: bool = True, profile_data: str | None = None,
                 profile_images: Any = None, profile_labels: Any = None, actor: str | None = None) -> Version:
        """Register the model at ``source`` (a run folder or a model folder) as the next version of ``name``.

        The artifact is copied into the registry's artifact folder under its content hash (reused when the same
        content is already there), then the version row, its ``tags`` and, with ``alias``, the alias move (with
        ``reason``) are written in one transaction. Lineage comes from the run folder: its resolved
        ``config.yaml`` and that config's hash, the training data's fingerprint (the examples' bytes, when the
        dataset can be loaded; or ``data_fingerprint`` given here), ``parent`` (a reference to the version this one
        was fine-tuned from), the evaluation ``metrics`` (default: the model's ``metrics.json``), vaekit's version,
        ``actor`` and the time. Returns the new :class:`Version`.

        The monitoring reference profile (:mod:`vaekit.registry.profile`) is computed on held-out images and
        stored in the registered artifact: ``profile_images`` (float (N, C, H, W) in [0, 1], with
        ``profile_labels`` for conditional models) when given, else ``profile_data`` (``"validation"``: the
        run's ``data.validation`` hold-out; ``"DATASET:test"``: a test split), else the run's hold-out when it
        has one. Never the training set: without held-out images (or with ``profile=False``) the version has
        no profile (``profile_data`` None).
        """
        from vaekit import __version__

        check_name(name)
        if alias is not None:
            check_alias(alias)
        if reason is not None:
            reason = _check_reason(reason)
        tags = self._check_tags(tags)
        parent_ref = parse_ref(parent) if parent is not None else None
        if description is not None and not isinstance(description, str):
            raise InputError(f"description must be a string, got {describe(description)}")
        if data_fingerprint is not None and not isinstance(data_fingerprint, str):
            raise InputError(f"data_fingerprint must be a string, got {describe(data_fingerprint)}")
        if parent_ref is not None:
            self.get(parent_ref)  # a wrong parent fails before anything is copied (and again in the transaction)
        src = read_source(source)
        metrics_doc = _check_json(dict(metrics), "metrics") if metrics is not None else src.metrics
        loaded: list[Any] = []

        def examples() -> Any:  # the dataset is loaded at most once, for the fingerprint and the hold-out
            if not loaded:
                loaded.append(training_examples(src.data))
            return loaded[0]

        fingerprint = data_fingerprint or self._fingerprint(src.data, examples)
        actor = actor or self.actor
        if not profile and (profile_data is not None or profile_images is not None):
            raise InputError("profile=False contradicts profile_data / profile_images; pass one or the other")
        held = self._held_out(src, profile_data, profile_images, profile_labels, examples) if profile else None
        if held is None:
            stored, profile_source = self.store.put(src.model_dir), None
        else:
            from vaekit.models.base import load_model
            from vaekit.registry.profile import attach_profile, compute_profile

            images, labels, profile_source = held
            prof = compute_profile(load_model(src.model_dir), images, labels, source=profile_source)
            stored = self.store.put(src.model_dir, build=lambda s, d: attach_profile(s, prof, dst=d))
        row = dict(
            name=name, artifact_hash=stored.hash, artifact_path=stored.relpath, family=src.family,
            description=description, source=str(Path(source).resolve()),
            run_dir=str(src.run_dir.resolve()) if src.run_dir else None,
            run_config=_json_safe(src.run_config), run_config_hash=canonical_hash(_json_safe(src.run_config))
            if src.run_config is not None else None, run_config_revisions=_json_safe(src.revisions),
            data_fingerprint=fingerprint, data=_json_safe(src.data),
            metrics=_json_safe(metrics_doc), profile_data=profile_source, vaekit_version=__version__, created_by=actor)

        def insert_version() -> int:
            with self.engine.begin() as conn:
                if parent_ref is not None:
                    pv = self._resolve(conn, parent_ref)
                    self._live_version(conn, parent_ref.name, pv, lock=False)
                    row.update(parent_name=parent_ref.name, parent_version=pv)
                latest = conn.execute(select(func.max(S.versions.c.version))
                                      .where(S.versions.c.name == name)).scalar() or 0
                number = latest + 1
                # the unique (name, version) constraint turns a concurrent writer's equal number into an
                # IntegrityError; the retry reads the new maximum
                conn.execute(insert(S.versions).values(**row, version=number, created_at=utc_now()))
                for key, value in tags.items():
                    conn.execute(insert(S.tags).values(name=name, version=number, key=key, value=value))
                if alias is not None:
                    self._move(conn, name, alias, number, reason or f"registered {name}/{number}", actor, None,
                               action="set")
                return number

        number = run_with_retry(insert_version, attempts=50)
        return self.get(Ref(name, version=number))

    @staticmethod
    def _held_out(src: Any, profile_data: str | None, images: Any, labels: Any,
                  examples: Any) -> tuple[Any, Any, str] | None:
        """(images, labels, description) to profile on, or None when there are no held-out images."""
        from vaekit.registry.lineage import held_out_images

        if images is not None:
            return images, labels, profile_data or "images passed to register"
        if profile_data is not None:
            return held_out_images(profile_data, src.data, src.run_dir, examples)
        if src.data and src.data.get("validation"):
            try:
                return held_out_images("validation", src.data, src.run_dir, examples)
            except DataError as exc:  # asked for nothing explicitly: register without a profile, loudly
                warnings.warn(f"no reference profile: the run's validation images could not be loaded ({exc})",
                              stacklevel=4)
        return None

    @staticmethod
    def _fingerprint(data: dict[str, Any] | None, examples: Any) -> str | None:
        if not data:
            return None
        try:
            _, train, _ = examples()
        except DataError as exc:
            warnings.warn(f"no training-data fingerprint: the dataset could not be loaded ({exc})", stacklevel=3)
            return None
        return fingerprint_examples(data, train)

    @staticmethod
    def _check_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
        if tags is None:
            return {}
        if not isinstance(tags, Mapping):
            raise InputError(f"tags must be a mapping of tag names to strings, got {describe(tags)}")
        out = {}
        for key, value in tags.items():
            check_name(key, "tag name")
            if not isinstance(value, str | int | float | bool):
                raise InputError(f"tag {key!r} must be a string (or number), got {describe(value)}")
            out[key] = str(value)
        return out

    # ---- tags and deletion ------------------------------------------------------------------------------------

    def _live_version(self, conn: Connection, name: str, version: int, *, lock: bool) -> Any:
        q = select(S.versions).where(S.versions.c.name == name, S.versions.c.version == version)
        row = conn.execute(q.with_for_update() if lock else q).first()
        if row is None:
            self._require_name(conn, name)
            raise RegistryLookupError(f"model {name!r} has no version {version}")
        if row.deleted_at is not None:
            raise RegistryError(f"{name}/{version} was deleted ({row.deleted_reason}); pick a live version")
        return row

    def set_tag(self, ref: str | Ref, key: str, value: str) -> None:
        """Set tag ``key`` of the version ``ref`` names to ``value`` (tags are the one mutable part of a version)."""
        r = parse_ref(ref)
        tag = self._check_tags({key: value})

        def write() -> None:
            with self.engine.begin() as conn:
                number = self._resolve(conn, r)
                self._live_version(conn, r.name, number, lock=True)
                t = S.tags.c
                done = conn.execute(update(S.tags).where(t.name == r.name, t.version == number, t.key == key)
                                    .values(value=tag[key]))
                if done.rowcount == 0:
                    conn.execute(insert(S.tags).values(name=r.name, version=number, key=key, value=tag[key]))

        run_with_retry(write)

    def delete_tag(self, ref: str | Ref, key: str) -> None:
        r = parse_ref(ref)
        with self.engine.begin() as conn:
            number = self._resolve(conn, r)
            t = S.tags.c
            conn.execute(S.tags.delete().where(t.name == r.name, t.version == number, t.key == key))

    def delete(self, ref: str | Ref, reason: str, *, actor: str | None = None) -> Version:
        """Mark the version ``ref`` (``name/V``) deleted. Refused (RegistryError) while an alias points at it.

        The row stays (its number is never reused, its lineage still resolves); its artifact becomes garbage for
        :meth:`gc` unless another live version holds the same content.
        """
        r = parse_ref(ref)
        if r.version is None:
            raise InputError(f"ref to delete must name a version ('NAME/VERSION'), got {str(r)!r}")
        reason = _check_reason(reason)
        actor = actor or self.actor

        def write() -> None:
            with self.engine.begin() as conn:
                # the row lock orders this against a concurrent set_alias to the same version
                self._live_version(conn, r.name, r.version, lock=True)
                held = sorted(conn.execute(select(S.aliases.c.alias).where(
                    S.aliases.c.name == r.name, S.aliases.c.version == r.version)).scalars())
                if held:
                    raise RegistryError(f"{r} cannot be deleted: the alias(es) {', '.join(held)} point at it; move "
                                        "them to another version first")
                conn.execute(update(S.versions).where(S.versions.c.name == r.name, S.versions.c.version == r.version)
                             .values(deleted_at=utc_now(), deleted_by=actor, deleted_reason=reason))

        run_with_retry(write)
        return self.get(r, include_deleted=True)

    # ---- aliases ------------------------------------------------------------------------------------------------

    def _move(self, conn: Connection, name: str, alias: str, to_version: int | None, reason: str, actor: str,
              evidence: Any, action: str) -> AliasEvent | None:
        """Point ``alias`` at ``to_version`` (None: remove it) and append the move to the history, in ``conn``'s
        transaction. None when the alias already holds ``to_version`` (nothing moves, nothing is recorded)."""
        a = S.aliases.c
        # lock order, everywhere: the alias row, then the version row (delete locks only the version row)
        current = conn.execute(select(a.version).where(a.name == name, a.alias == alias).with_for_update()).scalar()
        if to_version is not None:
            self._live_version(conn, name, to_version, lock=True)
        if current == to_version:
            return None
        now = utc_now()
        if to_version is None:
            conn.execute(S.aliases.delete().where(a.name == name, a.alias == alias))
        elif current is None:
            # a concurrent first move of the same alias fails on the primary key and is retried
            conn.execute(insert(S.aliases).values(name=name, alias=alias, version=to_version, updated_at=now,
                                                  updated_by=actor))
        else:
            conn.execute(update(S.aliases).where(a.name == name, a.alias == alias)
                         .values(version=to_version, updated_at=now, updated_by=actor))
        event = dict(name=name, alias=alias, action=action, from_version=current, to_version=to_version,
                     actor=actor, at=now, reason=reason, evidence=evidence)
        new_id = conn.execute(insert(S.alias_history).values(**event)).inserted_primary_key[0]
        return AliasEvent(id=new_id, **event)

    def set_alias(self, name: str, alias: str, version: int, reason: str, *, actor: str | None = None,
                  evidence: Any = None) -> AliasEvent | None:
        """Point ``alias`` of ``name`` at ``version``, recording from-version, to-version, actor, time, ``reason``
        and ``evidence`` (JSON) in the alias history, all in one transaction.

        Returns the history entry, or None when the alias already pointed at ``version`` (nothing recorded).
        """
        check_name(name)
        check_alias(alias)
        version = check_version(version)
        reason = _check_reason(reason)
        evidence = _check_json(evidence, "evidence")
        actor = actor or self.actor

        def write() -> AliasEvent | None:
            with self.engine.begin() as conn:
                return self._move(conn, name, alias, version, reason, actor, evidence, action="set")

        return run_with_retry(write)

    def remove_alias(self, name: str, alias: str, reason: str, *, actor: str | None = None,
                     evidence: Any = None) -> AliasEvent:
        """Remove ``alias`` of ``name`` (recorded in the history with to-version None)."""
        check_name(name)
        check_alias(alias)
        reason = _check_reason(reason)
        evidence = _check_json(evidence, "evidence")
        actor = actor or self.actor

        def write() -> AliasEvent:
            with self.engine.begin() as conn:
                event = self._move(conn, name, alias, None, reason, actor, evidence, action="remove")
                if event is None:
                    self._require_name(conn, name)
                    raise RegistryLookupError(f"model {name!r} has no alias {alias!r}")
                return event

        return run_with_retry(write)

    def rollback(self, name: str, alias: str, reason: str, *, actor: str | None = None,
                 evidence: Any = None) -> AliasEvent:
        """Move ``alias`` back to the version that held it before the current one, and record that move.

        The history is read as a stack: each ``set`` pushes its version, each rollback pops one, so repeated
        rollbacks walk further back (3 -> 2 -> 1) rather than toggling. RegistryError when there is no earlier
        holder, when the alias was unset before the current holder, or when that version was deleted.
        """
        check_name(name)
        check_alias(alias)
        reason = _check_reason(reason)
        evidence = _check_json(evidence, "evidence")
        actor = actor or self.actor
        a, h = S.aliases.c, S.alias_history.c

        def write() -> AliasEvent:
            with self.engine.begin() as conn:
                current = conn.execute(select(a.version).where(a.name == name, a.alias == alias)
                                       .with_for_update()).scalar()
                if current is None:
                    self._require_name(conn, name)
                    raise RegistryLookupError(f"model {name!r} has no alias {alias!r} to roll back")
                stack: list[int | None] = []
                for action, to_version in conn.execute(select(h.action, h.to_version)
                                                       .where(h.name == name, h.alias == alias).order_by(h.id)):
                    if action == "rollback":
                        stack.pop()
                    else:
                        stack.append(to_version)
                assert stack and stack[-1] == current, (stack, current)
                if len(stack) < 2:
                    raise RegistryError(f"{name}@{alias} has no earlier holder to roll back to (it has only ever "
                                        f"pointed at version {current} since it was set)")
                target = stack[-2]
                if target is None:
                    raise RegistryError(f"{name}@{alias} was unset before version {current} took it; use "
                                        "remove_alias or set it explicitly")
                event = self._move(conn, name, alias, target, reason, actor, evidence, action="rollback")
                assert event is not None
                return event

        return run_with_retry(write)

    # ---- integrity and housekeeping -------------------------------------------------------------------------------

    def verify(self, ref: str | Ref) -> Version:
        """Re-hash the artifact of ``ref``; RegistryError naming it when it is missing or differs."""
        ver = self.get(ref)
        self.store.verify(str(ver.artifact_path.relative_to(self.store.root)), ver.artifact_hash)
        return ver

    def gc(self, *, min_age_s: float = 3600.0, dry_run: bool = False) -> list[Path]:
        """Remove artifact folders no live version refers to (orphans of killed registrations, deleted versions)
        and staging leftovers, when older than ``min_age_s`` seconds. Returns the folders removed."""
        with self._read.connect() as conn:
            live = set(conn.execute(select(S.versions.c.artifact_path)
                                    .where(S.versions.c.deleted_at.is_(None))).scalars())
        return self.store.gc(live, min_age_s=min_age_s, dry_run=dry_run)


__all__ = ["DEFAULT_URI", "AliasEvent", "ModelRegistry", "ModelSummary", "Version"]
