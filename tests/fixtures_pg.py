"""PostgreSQL for the tests: a real server, never a mock, and never a skip.

`pg_url` (session): $PATCHD_TEST_PG_URL when set (a server someone else runs; the role must be
allowed to CREATE DATABASE), else a private server that daemon.tools.pgserver starts with initdb in a
temporary directory on a free port and stops when the session ends. A missing or broken server
fails the tests that need it, loudly.

`backend` is parametrised "sqlite" / "postgresql", so a test that takes `db_url` (an empty
database), `migrated_url` (one at the newest revision) or `store` (a Store on it) runs on both.
PostgreSQL test databases are copied from a migrated template, which is faster than migrating.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import create_engine, make_url, text

from daemon.tools.pgserver import PostgresServer
from memory.store import Store

_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    external = os.environ.get("PATCHD_TEST_PG_URL")
    if external:
        yield external
        return
    # fsync off: the server's own crash durability is not under test, and it makes tests fast
    server = PostgresServer(durable=False)
    server.start()  # raises PostgresUnavailable with the server log: fail, don't skip
    try:
        yield server.url
    finally:
        server.stop()


def _create_database(pg_url: str, template: str | None = None) -> str:
    name = f"patchd_test_{os.getpid()}_{next(_counter)}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
    finally:
        admin.dispose()
    return name


def _drop_database(pg_url: str, name: str) -> None:
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def _url_of(pg_url: str, name: str) -> str:
    return make_url(pg_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_template(pg_url: str) -> Iterator[str]:
    """A migrated database that per-test databases are copied from (faster than migrating each)."""
    name = _create_database(pg_url)
    Store.open(_url_of(pg_url, name)).close()
    yield name
    _drop_database(pg_url, name)


@pytest.fixture
def pg_database(pg_url: str) -> Iterator[str]:
    """A fresh, empty database on the test server; dropped afterwards."""
    name = _create_database(pg_url)
    yield _url_of(pg_url, name)
    _drop_database(pg_url, name)


@pytest.fixture
def pg_database_factory(pg_url: str, pg_template: str) -> Iterator[Callable[[], str]]:
    """make_database() -> the URL of a new migrated database on the test server; all dropped afterwards
    (a test that runs two daemons side by side needs two)."""
    made: list[str] = []

    def make_database() -> str:
        made.append(_create_database(pg_url, template=pg_template))
        return _url_of(pg_url, made[-1])

    yield make_database
    for name in made:
        _drop_database(pg_url, name)


@pytest.fixture
def daemon_database(backend: str, request: pytest.FixtureRequest) -> Callable[[], str | None]:
    """For daemon tests run on both backends: make() -> None (the config's SQLite default under its
    state dir) or the URL of a new PostgreSQL database, the production backend."""
    if backend == "sqlite":
        return lambda: None
    factory: Callable[[], str] = request.getfixturevalue("pg_database_factory")
    return factory


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    """Parametrises a test over both backends."""
    return str(request.param)


@pytest.fixture
def db_url(backend: str, request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> str:
    """An empty database (no tables) on `backend`."""
    if backend == "sqlite":
        return f"sqlite+pysqlite:///{tmp_path}/patchd.db"
    return str(request.getfixturevalue("pg_database"))


@pytest.fixture
def migrated_url(backend: str, request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Iterator[str]:
    """A database at the newest schema revision on `backend`."""
    if backend == "sqlite":
        yield f"sqlite+pysqlite:///{tmp_path}/patchd.db"  # Store.open migrates it (a few ms)
        return
    pg_url = request.getfixturevalue("pg_url")
    name = _create_database(pg_url, template=request.getfixturevalue("pg_template"))
    yield _url_of(pg_url, name)
    _drop_database(pg_url, name)


@pytest.fixture
def store(migrated_url: str) -> Iterator[Store]:
    with Store.open(migrated_url) as opened:
        yield opened
