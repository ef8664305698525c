"""Schema migrations, run programmatically (no alembic.ini needed at run time).

The Alembic config is built here and points at the `migrations` folder next to this file, so
the migrations are found the same way from a source checkout, an editable install and a wheel
(pyproject's package-data ships memory/migrations/*.py and versions/*.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, inspect, text

from memory.engine import WRITE_OPTION

if TYPE_CHECKING:  # alembic is imported only to migrate: `patchd status` must start fast
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# the newest migration, so that opening a store needs no alembic import (about 0.2 s);
# tests/test_memory_migrations.py checks it against the migrations folder
HEAD = "0003"


class SchemaOutOfDate(RuntimeError):
    """The database is not at the revision this code expects."""


def alembic_config() -> Config:
    from alembic.config import Config

    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise FileNotFoundError(f"patchd's migrations are missing from {MIGRATIONS_DIR} (broken install?)")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    """The newest migration in the migrations folder (alembic reads every script to tell)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def current_revision(engine: Engine) -> str | None:
    """The database's revision: alembic_version's one row (None: an empty database)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        version = conn.scalar(text("SELECT version_num FROM alembic_version"))
        return None if version is None else str(version)


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Migrate the database behind `engine` to `revision`; returns the revision it ends at."""
    return _run(engine, "upgrade", revision)


def downgrade(engine: Engine, revision: str) -> str | None:
    return _run(engine, "downgrade", revision)


def _run(engine: Engine, action: str, revision: str) -> str | None:
    from alembic import command

    config = alembic_config()
    # a write connection: on SQLite the migration holds the write lock from its first statement
    with engine.execution_options(**{WRITE_OPTION: True}).connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        driver = conn.connection.driver_connection
        assert driver is not None
        if sqlite:
            # SQLite's documented way to rebuild a table other tables reference (what batch mode
            # does to change a CHECK): foreign keys off around it, checked after. Off, because
            # with them on, DROP TABLE deletes the referencing rows through ON DELETE CASCADE.
            # The pragma is a no-op inside a transaction, so it is set before alembic begins one.
            driver.execute("PRAGMA foreign_keys=OFF")
        try:
            config.attributes["connection"] = conn
            getattr(command, action)(config, revision)
            if sqlite:
                broken = driver.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"the migration left rows without their parent: {broken[:5]}")
        finally:
            if sqlite:
                driver.execute("PRAGMA foreign_keys=ON")
    return current_revision(engine)


def require_head(engine: Engine) -> None:
    """Raise SchemaOutOfDate unless the database is at the newest migration."""
    current, head = current_revision(engine), HEAD
    if current != head:
        raise SchemaOutOfDate(
            f"database schema is at revision {current or 'none (empty database)'}, this patchd needs {head}: "
            "run `patchd db upgrade --url ...`"
        )
