"""Alembic environment for patchd's database (memory/schema.py).

memory.migrate passes an open connection from the Store's own engine (so SQLite gets WAL and
BEGIN IMMEDIATE); the alembic command line gets its URL from `-x url=...`, else the
`sqlalchemy.url` option, else the default SQLite file under the state directory.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from memory.engine import WRITE_OPTION, default_url, make_engine
from memory.schema import Base

# Any constant works; it only has to be the same for every patchd process (pg_advisory_xact_lock).
PG_MIGRATION_LOCK = 0x7061746368  # "patch"


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # two processes upgrading at once: the second waits, then finds nothing to do
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK})
        context.run_migrations()


def main() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    engine = make_engine(url or default_url()).execution_options(**{WRITE_OPTION: True})
    try:
        with engine.connect() as conn:
            run_migrations(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("patchd migrations run online only: pass a database URL (-x url=...)")
main()
