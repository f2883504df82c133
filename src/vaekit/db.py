"""One SQL layer for the registry and the monitoring record store: SQLAlchemy Core 2 engines for SQLite and PostgreSQL.

``make_engine(uri)`` is the one place that knows about the two backends:

- ``sqlite:///path/to/file.db`` (the embedded default): WAL journal, a busy timeout, foreign keys on, and every
  transaction opened with ``BEGIN IMMEDIATE``. Python's sqlite3 module opens transactions lazily (a plain
  ``BEGIN`` that takes the write lock only at the first write); two writers that both read first then deadlock on
  the lock upgrade and one fails at once with "database is locked" whatever the timeout (the MLflow SQLite failure,
  mlflow/mlflow#6490). Taking the write lock at ``BEGIN`` makes writers queue on the busy timeout instead.
  Transactions through :func:`reader` only read and begin deferred, so they never wait for a writer.
- ``postgresql://...`` (a store shared by several machines): the psycopg 3 driver
  (``postgresql+psycopg://``), pre-ping so a connection dropped by the server is replaced, not raised.

Everything above this module writes portable SQLAlchemy Core; no other module switches on the dialect.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError

from vaekit.errors import InputError, describe

T = TypeVar("T")

BUSY_TIMEOUT_S = 30.0  # how long a SQLite writer waits for another one before failing
READ_ONLY = "vaekit_read_only"  # execution option: this transaction only reads


def parse_uri(uri: str) -> URL:
    """The SQLAlchemy URL for a ``sqlite:///`` or ``postgresql://`` URI (the psycopg 3 driver for PostgreSQL).

    Raises InputError naming the URI for anything else.
    """
    if not isinstance(uri, str) or not uri:
        raise InputError(f"uri must be a database URI such as 'sqlite:///registry/registry.db' or "
                         f"'postgresql://user@host/db', got {describe(uri)}")
    try:
        url = make_url(uri)
    except ArgumentError as exc:
        raise InputError(f"uri {uri!r} is not a database URI ({exc}); use 'sqlite:///PATH' or "
                         "'postgresql://user@host:port/db'") from None
    backend, _, driver = url.drivername.partition("+")
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg"):
            raise InputError(f"uri {uri!r} names the driver {driver!r}; vaekit uses psycopg 3 "
                             "('postgresql://' or 'postgresql+psycopg://')")
        return url.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if driver not in ("", "pysqlite"):
            raise InputError(f"uri {uri!r} names the driver {driver!r}; use 'sqlite:///PATH'")
        if not url.database or url.database == ":memory:":
            # each pooled connection would get its own empty in-memory database
            raise InputError(f"uri {uri!r} needs a file: use 'sqlite:///PATH/TO/FILE.db'")
        return url.set(drivername="sqlite+pysqlite")
    raise InputError(f"uri {uri!r} has the scheme {url.drivername!r}; allowed: 'sqlite:///PATH' or "
                     "'postgresql://user@host:port/db'")


def is_sqlite(engine_or_url: Engine | URL) -> bool:
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else engine_or_url
    return url.get_backend_name() == "sqlite"


def sqlite_path(url: URL) -> Path | None:
    """The database file of a SQLite URL (None for PostgreSQL)."""
    return Path(url.database) if url.get_backend_name() == "sqlite" and url.database else None


def make_engine(uri: str, *, busy_timeout_s: float = BUSY_TIMEOUT_S, **kwargs: Any) -> Engine:
    """An Engine for ``uri`` with the settings each backend needs for several concurrent processes.

    SQLite: the file's folder is created; connections set WAL, ``busy_timeout`` (``busy_timeout_s`` seconds),
    ``foreign_keys=ON`` and ``synchronous=NORMAL`` (durable at each checkpoint in WAL mode; a crash loses at
    most the last commits, never consistency), and every transaction starts with ``BEGIN IMMEDIATE``.
    PostgreSQL: ``pool_pre_ping``. ``kwargs`` go to :func:`sqlalchemy.create_engine`.
    """
    url = parse_uri(uri)
    if is_sqlite(url):
        path = sqlite_path(url)
        assert path is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"timeout": busy_timeout_s, **kwargs.pop("connect_args", {})}
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        _sqlite_events(engine, busy_timeout_s)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def _sqlite_events(engine: Engine, busy_timeout_s: float) -> None:
    # The SQLAlchemy recipe for SQLite transactions ("Serializable isolation / Savepoints / Transactional DDL"):
    # switch off the driver's own BEGIN handling and emit BEGIN ourselves.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # a read-only transaction (see reader()) stays deferred: in WAL mode it reads a snapshot without
        # taking the write lock, so readers never wait for writers
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def reader(engine: Engine) -> Engine:
    """A view of ``engine`` whose transactions only read: on SQLite they begin deferred (no write lock, a
    consistent snapshot); on PostgreSQL nothing changes. Writing through it on SQLite can fail with "database is
    locked" instead of waiting, so use it only for reads."""
    return engine.execution_options(**{READ_ONLY: True})


def is_retryable(exc: BaseException) -> bool:
    """A conflict a retry can resolve: a unique-key race, a serialization failure, a deadlock, a busy SQLite."""
    if isinstance(exc, IntegrityError):
        return True
    if isinstance(exc, OperationalError | DBAPIError):
        code = getattr(getattr(exc, "orig", None), "sqlstate", None)  # psycopg
        if code in ("40001", "40P01", "23505"):
            return True
        text = str(getattr(exc, "orig", exc)).lower()
        return "database is locked" in text or "database is busy" in text
    return False


def run_with_retry(fn: Callable[[], T], *, attempts: int = 20, base_delay_s: float = 0.005,
                   retryable: Callable[[BaseException], bool] = is_retryable) -> T:
    """Call ``fn`` (one whole transaction) again after a retryable conflict, with jittered exponential back-off.

    ``fn`` must open and commit its own transaction so that each attempt starts afresh; the last error is raised
    when ``attempts`` run out.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts - 1 or not retryable(exc):
                raise
            time.sleep(base_delay_s * (2 ** min(attempt, 6)) * (0.5 + random.random()))
    raise AssertionError("unreachable")
