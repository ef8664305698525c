"""Schema migrations, run programmatically (no alembic.ini needed at run time).

The Alembic config is built here and points at the `migrations` folder next to this file, so
the migrations are found the same way from a source checkout, an editable install and a wheel
(pyproject's package-data ships memory/migrations/*.py and versions/*.py).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from memory.engine import WRITE_OPTION

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


class SchemaOutOfDate(RuntimeError):
    """The database is not at the revision this code expects."""


def alembic_config() -> Config:
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise FileNotFoundError(f"patchd's migrations are missing from {MIGRATIONS_DIR} (broken install?)")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Migrate the database behind `engine` to `revision`; returns the revision it ends at."""
    return _run(engine, "upgrade", revision)


def downgrade(engine: Engine, revision: str) -> str | None:
    return _run(engine, "downgrade", revision)


def _run(engine: Engine, action: str, revision: str) -> str | None:
    config = alembic_config()
    # a write connection: on SQLite the migration holds the write lock from its first statement
    with engine.execution_options(**{WRITE_OPTION: True}).connect() as conn:
        config.attributes["connection"] = conn
        getattr(command, action)(config, revision)
    return current_revision(engine)


def require_head(engine: Engine) -> None:
    """Raise SchemaOutOfDate unless the database is at the newest migration."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise SchemaOutOfDate(
            f"database schema is at revision {current or 'none (empty database)'}, this patchd needs {head}: "
            "run `patchd db upgrade --url ...`"
        )
