"""Copy every row of one patchd database into another: SQLite -> PostgreSQL (or back).

    counts = copy_database("sqlite:////var/lib/patchd/patchd.db", "postgresql://patchd@db/patchd")

The source must be at the newest schema revision (`patchd db upgrade --url SOURCE`) and quiet
(the daemon stopped). The target is migrated to the newest revision first and must hold no rows;
the whole copy is one transaction on it, so a failure leaves it empty. Tables are copied parents
first (Base.metadata's dependency order), rows in primary-key order, in batches; ids are kept as
they are (patch ids are the replay order, mistake ids are edit ids), and PostgreSQL's id sequences
are moved past the copied ids so that new rows do not collide.
"""

from __future__ import annotations

from sqlalchemy import Engine, Integer, func, select, text
from sqlalchemy.engine import URL

from memory import migrate
from memory.engine import WRITE_OPTION, make_engine
from memory.schema import Base

# rows per INSERT batch: large enough to amortise round trips, small enough for modest memory
BATCH_ROWS = 2000


class CopyError(RuntimeError):
    """The copy cannot start (target not empty, source not migrated)."""


def copy_database(source: str | URL, target: str | URL, batch_rows: int = BATCH_ROWS) -> dict[str, int]:
    """Copy every table from `source` to `target`; rows copied per table."""
    src, dst = make_engine(source), make_engine(target)
    try:
        try:
            migrate.require_head(src)
        except migrate.SchemaOutOfDate as exc:
            raise CopyError(f"source: {exc}") from None
        migrate.upgrade(dst)
        _require_empty(dst)
        return _copy(src, dst, batch_rows)
    finally:
        src.dispose()
        dst.dispose()


def _require_empty(engine: Engine) -> None:
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            rows = conn.scalar(select(func.count()).select_from(table))
            if rows:
                raise CopyError(f"target table {table.name} already has {rows} rows; copy into an empty database")


def _copy(src: Engine, dst: Engine, batch_rows: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    with src.connect() as read, dst.execution_options(**{WRITE_OPTION: True}).begin() as write:
        for table in Base.metadata.sorted_tables:
            result = read.execution_options(yield_per=batch_rows).execute(
                select(table).order_by(*table.primary_key.columns)
            )
            copied = 0
            for rows in result.partitions():
                write.execute(table.insert(), [dict(row._mapping) for row in rows])
                copied += len(rows)
            counts[table.name] = copied
        if dst.dialect.name == "postgresql":
            for table in Base.metadata.sorted_tables:
                pk = list(table.primary_key.columns)
                if len(pk) == 1 and isinstance(pk[0].type, Integer):
                    # the next id after the largest copied one (is_called=false: that value itself)
                    write.execute(
                        text(
                            f"SELECT setval(pg_get_serial_sequence(:table, :column), "
                            f'COALESCE((SELECT MAX("{pk[0].name}") FROM "{table.name}"), 0) + 1, false)'
                        ),
                        {"table": table.name, "column": pk[0].name},
                    )
    return counts
