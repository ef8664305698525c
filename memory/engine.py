"""One SQLAlchemy engine per Store, configured for the two backends patchd supports.

SQLite (the embedded default, one file under the state directory):
- WAL journal: readers never block the writer and the writer never blocks readers, so the
  worker can read while the consumer writes.
- busy timeout 30 s: a second writer waits for the lock instead of failing at once.
- write transactions start with `BEGIN IMMEDIATE`: the write lock is taken up front. A deferred
  transaction that reads first and writes later can hit SQLITE_BUSY without the busy handler
  ever being called ("database is locked"), because SQLite cannot upgrade its read snapshot.
  Read-only transactions use a plain deferred `BEGIN`.
- synchronous=FULL: in WAL mode, NORMAL may lose the last commits on power loss or an OS crash.
  The consumer commits Kafka offsets right after our commit, so a lost commit would be a lost
  correction; FULL costs one fsync per transaction, which batching makes cheap.
- foreign keys on (SQLite leaves them off by default).

PostgreSQL: psycopg 3, READ COMMITTED; `pool_pre_ping` so a restarted server does not leave dead
connections in the pool.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine import URL

# how long a SQLite writer waits for another writer's lock before giving up, in seconds
SQLITE_BUSY_TIMEOUT_S = 30.0
# file name of the embedded database inside the state directory
SQLITE_FILENAME = "patchd.db"
# where state lives when neither --state-dir nor PATCHD_STATE_DIR says otherwise (XDG state dir)
DEFAULT_STATE_DIR = "~/.local/state/patchd"
# execution option that marks a connection for write transactions (BEGIN IMMEDIATE on SQLite)
WRITE_OPTION = "patchd_write"


def state_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The state directory: `explicit`, else $PATCHD_STATE_DIR, else ~/.local/state/patchd."""
    chosen = explicit or os.environ.get("PATCHD_STATE_DIR") or DEFAULT_STATE_DIR
    return Path(chosen).expanduser()


def default_url(state: str | os.PathLike[str] | None = None) -> str:
    """The embedded SQLite database under the state directory (created if missing)."""
    directory = state_dir(state)
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite+pysqlite:///{directory / SQLITE_FILENAME}"


def normalise_url(url: str | URL) -> URL:
    """Pin the driver: plain `postgresql://` means psycopg 3 here, `sqlite://` means pysqlite."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif parsed.drivername == "sqlite":
        parsed = parsed.set(drivername="sqlite+pysqlite")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(
            f"unsupported database URL {parsed.render_as_string(hide_password=True)!r}: "
            "patchd supports sqlite:///PATH and postgresql://..."
        )
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ValueError(
            "an in-memory SQLite database cannot be shared between the daemon's threads; "
            "give a file path (sqlite:///PATH)"
        )
    return parsed


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """An engine for `url` with the settings described in this module's docstring."""
    parsed = normalise_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, **kwargs)
    # psycopg prepares a statement after 5 runs and PostgreSQL may then keep a generic plan made
    # while the tables were tiny (a sequential scan); ingest tables grow fast, so plan every time.
    return create_engine(parsed, pool_pre_ping=True, connect_args={"prepare_threshold": None}, **kwargs)


def _sqlite_engine(url: URL, **kwargs: Any) -> Engine:
    if url.database:
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
        **kwargs,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite: it would emit its own deferred BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        write = connection.get_execution_options().get(WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"
