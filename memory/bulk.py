"""Fast multi-row INSERT ... ON CONFLICT DO NOTHING on both backends, and array membership tests.

SQLAlchemy's executemany builds and type-processes a parameter dict per row (tens of µs each);
at the ingest rates patchd targets that was most of the time. Here values are converted once
per column (a batch shares one `received_at`, converted once), and then:

- SQLite: the driver's `executemany` of one prepared INSERT (in-process, no round trips).
- PostgreSQL: ONE statement, `INSERT ... SELECT * FROM unnest(%(a)s::type[], %(b)s::type[], ...)`,
  one array per column. A row per statement would cost a round trip and a statement execution
  per row, even with psycopg's pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import JSON, ColumnElement, Connection, Dialect, LargeBinary, String, Table, any_, bindparam
from sqlalchemy.dialects import postgresql, sqlite

# (dialect, driver, table, columns, conflict) -> (SQL text, positional parameter order or None)
_SQL: dict[tuple[str, str, str, tuple[str, ...], tuple[str, ...]], tuple[str, tuple[str, ...] | None]] = {}


def upsert_insert(dialect_name: str, table: Table) -> Any:
    """The dialect's INSERT, which has on_conflict_do_nothing / on_conflict_do_update."""
    return (sqlite if dialect_name == "sqlite" else postgresql).insert(table)


def in_list(column: Any, name: str, dialect_name: str) -> ColumnElement[bool]:
    """`column IN (:name...)`; on PostgreSQL `column = ANY(:name)`, one array parameter."""
    if dialect_name == "postgresql":
        return column == any_(bindparam(name, type_=postgresql.ARRAY(String)))  # type: ignore[no-any-return]
    return column.in_(bindparam(name, expanding=True))  # type: ignore[no-any-return]


def insert_many(
    conn: Connection, table: Table, names: Sequence[str], rows: Sequence[tuple[Any, ...]], conflict: list[str]
) -> None:
    """INSERT ... ON CONFLICT (conflict) DO NOTHING of `rows`, tuples in `names` order."""
    if not rows:
        return
    dialect = conn.dialect
    sql, order = _sql(dialect, table, tuple(names), tuple(conflict))
    columns = list(zip(*rows, strict=True))  # one tuple per column
    for i, name in enumerate(names):
        column_type = table.c[name].type
        if dialect.name == "postgresql" and isinstance(column_type, JSON):
            columns[i] = tuple(None if v is None else json.dumps(v) for v in columns[i])  # cast ::json in SQL
            continue
        if isinstance(column_type, LargeBinary):
            continue  # sqlite3 and psycopg send bytes as BLOB/bytea themselves; the wrapper only costs time
        process = column_type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            columns[i] = _convert(process, columns[i])
    if dialect.name == "postgresql":
        conn.exec_driver_sql(sql, {f"c{i}": list(values) for i, values in enumerate(columns)})
    else:
        by_name = dict(zip(names, columns, strict=True))
        conn.exec_driver_sql(sql, list(zip(*(by_name[name] for name in order or ()), strict=True)))


def _sql(
    dialect: Dialect, table: Table, names: tuple[str, ...], conflict: tuple[str, ...]
) -> tuple[str, tuple[str, ...] | None]:
    key = (dialect.name, dialect.driver, table.name, names, conflict)
    if key not in _SQL:
        _SQL[key] = (
            _postgres_sql(dialect, table, names, conflict)
            if dialect.name == "postgresql"
            else _sqlite_sql(dialect, table, names, conflict)
        )
    return _SQL[key]


def _sqlite_sql(
    dialect: Dialect, table: Table, names: tuple[str, ...], conflict: tuple[str, ...]
) -> tuple[str, tuple[str, ...] | None]:
    stmt = upsert_insert(dialect.name, table).values({name: bindparam(name) for name in names})
    compiled = stmt.on_conflict_do_nothing(index_elements=list(conflict)).compile(dialect=dialect)
    return str(compiled), tuple(compiled.positiontup or ())


def _postgres_sql(
    dialect: Dialect, table: Table, names: tuple[str, ...], conflict: tuple[str, ...]
) -> tuple[str, tuple[str, ...] | None]:
    arrays, selected = [], []
    for i, name in enumerate(names):
        column_type = table.c[name].type
        if isinstance(column_type, JSON):
            arrays.append(f"%(c{i})s::TEXT[]")
            selected.append(f"u.c{i}::JSON")
        else:
            arrays.append(f"%(c{i})s::{column_type.compile(dialect=dialect)}[]")
            selected.append(f"u.c{i}")
    aliases = ", ".join(f"c{i}" for i in range(len(names)))
    sql = (
        f"INSERT INTO {table.name} ({', '.join(names)}) "
        f"SELECT {', '.join(selected)} FROM unnest({', '.join(arrays)}) AS u({aliases}) "
        f"ON CONFLICT ({', '.join(conflict)}) DO NOTHING"
    )
    return sql, None


def _convert(process: Any, values: tuple[Any, ...]) -> tuple[Any, ...]:
    """Apply a bind processor, converting each distinct object once (e.g. the batch's `now`)."""
    last: Any = object()
    last_result: Any = None
    out = []
    for value in values:
        if value is not last:
            last, last_result = value, process(value)
        out.append(last_result)
    return tuple(out)
