"""The registry's tables (SQLAlchemy Core, the same on SQLite and PostgreSQL) and its schema version.

Timestamps are ISO-8601 UTC strings (``2026-12-01T09:10:00.123456Z``): they sort as text and read the same on
both backends. JSON columns use SQLAlchemy's portable ``JSON`` type.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Column,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

SCHEMA_VERSION = 1  # bump with a migration in ModelRegistry._init_schema when a table changes

metadata = MetaData()

schema_table = Table(
    "registry_schema", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1: one row
    Column("version", Integer, nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("created_by_vaekit", String(32), nullable=False),
)

settings = Table(
    "registry_settings", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

versions = Table(
    "registry_versions", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False),
    Column("version", Integer, nullable=False),
    Column("artifact_hash", String(64), nullable=False),  # sha256 of the artifact's manifest, hex
    Column("artifact_path", Text, nullable=False),  # relative to the artifact root: sha256/<hh>/<hash>
    Column("family", String(64), nullable=True),
    Column("description", Text, nullable=True),
    Column("source", Text, nullable=True),  # the folder it was registered from
    Column("run_dir", Text, nullable=True),
    Column("run_config", JSON, nullable=True),  # the run's resolved config
    Column("run_config_hash", String(64), nullable=True),
    Column("run_config_revisions", JSON, nullable=True),  # every config of a run changed mid-run, else None
    Column("data_fingerprint", String(64), nullable=True),
    Column("data", JSON, nullable=True),  # the data settings the fingerprint was taken from
    Column("parent_name", String(128), nullable=True),
    Column("parent_version", Integer, nullable=True),
    Column("metrics", JSON, nullable=True),
    Column("profile_data", Text, nullable=True),  # which held-out images the reference profile came from
    Column("vaekit_version", String(32), nullable=False),
    Column("created_by", String(255), nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("deleted_at", String(32), nullable=True),  # versions are never removed: numbers are never reused
    Column("deleted_by", String(255), nullable=True),
    Column("deleted_reason", Text, nullable=True),
    UniqueConstraint("name", "version", name="uq_registry_versions_name_version"),
)

aliases = Table(
    "registry_aliases", metadata,
    Column("name", String(128), primary_key=True),
    Column("alias", String(128), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("updated_at", String(32), nullable=False),
    Column("updated_by", String(255), nullable=False),
    ForeignKeyConstraint(["name", "version"], ["registry_versions.name", "registry_versions.version"],
                         name="fk_registry_aliases_version"),
)

alias_history = Table(
    "registry_alias_history", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),  # the order of events
    Column("name", String(128), nullable=False),
    Column("alias", String(128), nullable=False),
    Column("action", String(16), nullable=False),  # set | rollback | remove
    Column("from_version", Integer, nullable=True),  # None: the alias did not exist before
    Column("to_version", Integer, nullable=True),  # None: the alias was removed
    Column("actor", String(255), nullable=False),
    Column("at", String(32), nullable=False),
    Column("reason", Text, nullable=False),
    Column("evidence", JSON, nullable=True),  # filled by the deployment layer (windows, decisions)
    Index("ix_registry_alias_history_name_alias", "name", "alias", "id"),
)

tags = Table(
    "registry_tags", metadata,
    Column("name", String(128), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("key", String(128), primary_key=True),
    Column("value", Text, nullable=False),
    ForeignKeyConstraint(["name", "version"], ["registry_versions.name", "registry_versions.version"],
                         name="fk_registry_tags_version"),
)
