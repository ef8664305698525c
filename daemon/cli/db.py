"""`patchd db upgrade | current | copy`: the database schema and moving to PostgreSQL.

Handlers import memory/ (SQLAlchemy, Alembic) lazily, so `patchd --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from daemon.cli.common import missing

if TYPE_CHECKING:
    from sqlalchemy import Engine


def register(sub: Any, bench: Any) -> None:
    db = sub.add_parser("db", help="manage patchd's database (SQLite by default, PostgreSQL by URL)")
    db.set_defaults(func=lambda args: missing(db))
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION")

    upgrade = db_sub.add_parser("upgrade", help="migrate the database schema to the newest revision")
    _add_url_options(upgrade)
    upgrade.add_argument("--revision", default="head", help="target revision (default: %(default)s)")
    upgrade.set_defaults(func=_upgrade)

    current = db_sub.add_parser("current", help="print the database's schema revision and the newest one")
    _add_url_options(current)
    current.set_defaults(func=_current)

    copy = db_sub.add_parser(
        "copy",
        help="copy every row into another, empty database (SQLite -> PostgreSQL); stop the daemon first",
    )
    copy.add_argument("--from", dest="source", required=True, help="source database URL (at the newest schema)")
    copy.add_argument("--to", dest="target", required=True, help="target database URL (migrated, must be empty)")
    copy.set_defaults(func=_copy)


def _add_url_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        help="database URL, e.g. postgresql://user@host/db (default: SQLite file patchd.db in the state directory)",
    )
    parser.add_argument("--state-dir", help="state directory (default: $PATCHD_STATE_DIR or ~/.local/state/patchd)")


def _engine(args: argparse.Namespace) -> Engine:
    from memory.engine import default_url, make_engine

    return make_engine(args.url or default_url(args.state_dir))


def _safe(engine: Engine) -> str:
    return str(engine.url.render_as_string(hide_password=True))


def _upgrade(args: argparse.Namespace) -> int:
    from memory import migrate

    engine = _engine(args)
    try:
        before = migrate.current_revision(engine)
        after = migrate.upgrade(engine, args.revision)
    finally:
        engine.dispose()
    print(f"{_safe(engine)}: schema revision {before or 'none'} -> {after}")
    return 0


def _current(args: argparse.Namespace) -> int:
    from memory import migrate

    engine = _engine(args)
    try:
        current, head = migrate.current_revision(engine), migrate.head_revision()
    finally:
        engine.dispose()
    state = "up to date" if current == head else "run `patchd db upgrade`"
    print(f"{_safe(engine)}: schema revision {current or 'none'}, newest {head} ({state})")
    return 0 if current == head else 1


def _copy(args: argparse.Namespace) -> int:
    from memory.copy import CopyError, copy_database
    from memory.engine import normalise_url

    source, target = (normalise_url(u).render_as_string(hide_password=True) for u in (args.source, args.target))
    try:
        counts = copy_database(args.source, args.target)
    except CopyError as exc:
        print(f"patchd db copy: {exc}", file=sys.stderr)
        return 1
    for table, rows in counts.items():
        print(f"{table:<20} {rows:>10,} rows")
    print(f"copied {source} -> {target}; point the daemon at the target (PATCHD_DATABASE_URL) and start it")
    return 0
