"""`record_batch` as set-based SQL: a batch of reports in a handful of statements.

Called inside the Store's write transaction, so a batch is stored whole or not at all. Ingest
transactions are serialised (SQLite: the BEGIN IMMEDIATE write lock; PostgreSQL: a
transaction-level advisory lock), which makes every read below authoritative until commit:

1. Drop event ids repeated inside the batch, then those already stored (one indexed lookup per
   500 ids): redelivered events are the common case after a consumer restart and cost nothing.
   Then the reporter rate limit: a named reporter's new reports beyond `limit` within the window
   (counting what is stored) become rejected rows, in Kafka order; anonymous reports count as one
   voice for quorum and are not limited. Redelivered reports were counted when first stored.
2. Create the batch's new mistakes and look up the ids of all its mistakes (report foreign keys).
3. Note the highest report id, insert the reports, and fold every report above that watermark
   into the targets (upsert count = count + n), the distinct reporters (insert, skip existing)
   and the mistakes' counters: three INSERT/UPDATE ... SELECT statements that run in the
   database, whatever the batch size.

Rows go in through memory/bulk.py (driver executemany on SQLite, one unnest() INSERT on
PostgreSQL), never one ORM object per event. Keys are sorted before inserting so that writers
that are not serialised (operators, migrations) take row locks in the same order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from sqlalchemy import Connection, Integer, Table, bindparam, func, select, text, update

from memory.bulk import in_list, insert_many, upsert_insert
from memory.lifecycle import Status
from memory.records import BatchResult, RateLimit, RejectedIn, ReportIn
from memory.schema import Mistake, MistakeReporter, MistakeTarget, Rejected, Report

# ids per IN (...) lookup; far below SQLite's 32,766 bound-parameter limit and PostgreSQL's 65,535
LOOKUP_CHUNK = 500
# the mistake_reporters key for a report without a reporter (see schema.MistakeReporter)
ANONYMOUS = ""
# the rejection reason of a report over its reporter's rate limit (daemon/messages.py Reason names it too)
RATE_LIMITED = "reporter_rate_limited"
# pg_advisory_xact_lock key that serialises ingest transactions on PostgreSQL ("ingest")
PG_INGEST_LOCK = 0x696E67657374

MISTAKES: Table = Mistake.__table__  # type: ignore[assignment]
TARGETS: Table = MistakeTarget.__table__  # type: ignore[assignment]
REPORTERS: Table = MistakeReporter.__table__  # type: ignore[assignment]
REPORTS: Table = Report.__table__  # type: ignore[assignment]
REJECTED: Table = Rejected.__table__  # type: ignore[assignment]

REPORT_COLUMNS = (
    "event_id",
    "model",
    "mistake_id",
    "target",
    "observed",
    "equivalents",
    "input",
    "input_pair",
    "reporter",
    "reported_at",
    "received_at",
    "model_version",
    "raw",
    "topic",
    "kafka_partition",
    "kafka_offset",
)
MISTAKE_COLUMNS = (
    "model",
    "fingerprint",
    "input_text",
    "report_count",
    "reporter_count",
    "first_seen",
    "last_seen",
    "status",
    "status_changed_at",
    "priority",
    "needs_policy",
)


@dataclass(frozen=True)
class _Statements:
    """The ingest statements of one dialect, built once so SQLAlchemy's compiled cache is hit."""

    stored_events: Any
    mistakes_by_key: Any
    mistakes_after: Any
    max_report_id: Any
    max_mistake_id: Any
    touched: Any
    add_targets: Any
    add_reporters: Any
    bump_mistakes: Any
    count_new: Any


@cache
def _statements(dialect_name: str) -> _Statements:
    watermark = bindparam("watermark", type_=Integer)
    new = REPORTS.c.id > watermark

    # The new reports are a rowid range. Grouped by the bare column, SQLite walks the whole
    # mistake_id index instead (to skip a sort), which at 1,000,000 reports made every batch five
    # times slower than on an empty database; "+ 0" keeps it on the range (SQLite's idiom).
    mistake_id = (REPORTS.c.mistake_id + 0) if dialect_name == "sqlite" else REPORTS.c.mistake_id
    per_target = (
        select(mistake_id, REPORTS.c.target, func.count())
        .where(new)
        .group_by(mistake_id, REPORTS.c.target)
        .order_by(mistake_id, REPORTS.c.target)
    )
    add_targets = upsert_insert(dialect_name, TARGETS).from_select(["mistake_id", "target", "count"], per_target)
    add_targets = add_targets.on_conflict_do_update(
        index_elements=["mistake_id", "target"], set_={"count": TARGETS.c.count + add_targets.excluded.count}
    )

    reporter = func.coalesce(REPORTS.c.reporter, ANONYMOUS)
    per_reporter = select(mistake_id, reporter).where(new).distinct().order_by(mistake_id, reporter)
    add_reporters = (
        upsert_insert(dialect_name, REPORTERS)
        .from_select(["mistake_id", "reporter"], per_reporter)
        .on_conflict_do_nothing(index_elements=["mistake_id", "reporter"])
    )

    new_of_mistake = REPORTS.alias("new_reports")
    added = (
        select(func.count())
        .where(new_of_mistake.c.mistake_id == MISTAKES.c.id, new_of_mistake.c.id > watermark)
        .scalar_subquery()
    )
    reporters = select(func.count()).where(REPORTERS.c.mistake_id == MISTAKES.c.id).scalar_subquery()
    bump_mistakes = (
        update(MISTAKES)
        .where(MISTAKES.c.id.in_(select(REPORTS.c.mistake_id).where(new)))
        .values(
            report_count=MISTAKES.c.report_count + added,
            reporter_count=reporters,
            last_seen=bindparam("now", type_=MISTAKES.c.last_seen.type),
            needs_policy=True,
        )
    )
    return _Statements(
        stored_events=select(REPORTS.c.event_id).where(in_list(REPORTS.c.event_id, "ids", dialect_name)),
        mistakes_by_key=select(MISTAKES.c.id, MISTAKES.c.fingerprint).where(
            MISTAKES.c.model == bindparam("model"),
            in_list(MISTAKES.c.fingerprint, "fps", dialect_name),
        ),
        mistakes_after=select(MISTAKES.c.id, MISTAKES.c.model, MISTAKES.c.fingerprint).where(
            MISTAKES.c.id > bindparam("watermark", type_=Integer)
        ),
        max_report_id=select(func.coalesce(func.max(REPORTS.c.id), 0)),
        max_mistake_id=select(func.coalesce(func.max(MISTAKES.c.id), 0)),
        # the mistakes this batch touches, locked in id order (PostgreSQL; SQLite ignores FOR UPDATE):
        # the bulk UPDATE below then waits for nothing, and cannot deadlock with the policy's locks.
        # Every row lock in memory/ is FOR NO KEY UPDATE (key_share=True), never FOR UPDATE: the
        # report rows inserted above take FOR KEY SHARE on their mistakes in event-id order, which
        # FOR UPDATE waits for, so a worker locking in id order could deadlock with this batch.
        touched=(
            select(MISTAKES.c.id)
            .where(MISTAKES.c.id.in_(select(REPORTS.c.mistake_id).where(new)))
            .order_by(MISTAKES.c.id)
            .with_for_update(key_share=True)
        ),
        add_targets=add_targets,
        add_reporters=add_reporters,
        bump_mistakes=bump_mistakes,
        count_new=select(func.count()).select_from(REPORTS).where(new),
    )


def record_reports(
    conn: Connection, reports: Sequence[ReportIn], now: datetime, rate_limit: RateLimit | None = None
) -> BatchResult:
    sql = _statements(conn.dialect.name)
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_INGEST_LOCK})
    unique: dict[str, ReportIn] = {}
    for report in reports:
        unique.setdefault(report.event_id, report)
    ids_in_batch = list(unique)
    stored: set[str] = set()
    for start in range(0, len(ids_in_batch), LOOKUP_CHUNK):
        chunk = ids_in_batch[start : start + LOOKUP_CHUNK]
        stored.update(conn.execute(sql.stored_events, {"ids": chunk}).scalars())
    fresh = [r for r in unique.values() if r.event_id not in stored]
    limited: tuple[RejectedIn, ...] = ()
    if rate_limit is not None and fresh:
        fresh, limited = _rate_limit(conn, fresh, rate_limit, now)
        record_rejected(conn, limited, now)
    fresh.sort(key=lambda r: r.event_id)
    if not fresh:
        return BatchResult(new_reports=0, duplicates=len(reports) - len(limited), mistakes_created=0,
                           mistakes_updated=0, rate_limited=limited)  # fmt: skip

    ids, created = _ensure_mistakes(conn, sql, fresh, now)
    watermark = int(conn.scalar(sql.max_report_id) or 0)
    # equivalents stay tuples: the empty () is one shared object, so bulk serialises it only once
    rows = [
        (r.event_id, r.model, ids[(r.model, r.fingerprint)], r.target, r.observed, r.equivalents,
         *_input_columns(r), r.reporter, r.reported_at, now, r.model_version, r.raw, r.topic, r.partition,
         r.offset)
        for r in fresh
    ]  # fmt: skip
    insert_many(conn, REPORTS, REPORT_COLUMNS, rows, conflict=["event_id"])

    params = {"watermark": watermark}
    touched = set(conn.execute(sql.touched, params).scalars())
    conn.execute(sql.add_targets, params)
    conn.execute(sql.add_reporters, params)
    conn.execute(sql.bump_mistakes, {**params, "now": now})
    new_reports = int(conn.scalar(sql.count_new, params) or 0)
    return BatchResult(
        new_reports=new_reports,
        duplicates=len(reports) - new_reports - len(limited),
        mistakes_created=len(created),
        mistakes_updated=len(touched - created),
        rate_limited=limited,
    )


def _rate_limit(
    conn: Connection, fresh: list[ReportIn], rate_limit: RateLimit, now: datetime
) -> tuple[list[ReportIn], tuple[RejectedIn, ...]]:
    """Split new reports into those within their reporter's limit and those over it (as rejections)."""
    named = sorted({r.reporter for r in fresh if r.reporter})
    if not named:
        return fresh, ()
    since = now - timedelta(seconds=rate_limit.window_s)
    counts: dict[str, int] = defaultdict(int)
    model = fresh[0].model  # one daemon, one model per batch
    for start in range(0, len(named), LOOKUP_CHUNK):
        rows = conn.execute(
            select(REPORTS.c.reporter, func.count())
            .where(REPORTS.c.model == model, REPORTS.c.reporter.in_(named[start : start + LOOKUP_CHUNK]))
            .where(REPORTS.c.received_at >= since)
            .group_by(REPORTS.c.reporter)
        )
        counts.update({reporter: int(n) for reporter, n in rows})
    kept: list[ReportIn] = []
    limited: list[RejectedIn] = []
    for report in sorted(fresh, key=lambda r: (r.topic, r.partition, r.offset)):  # first come, first kept
        if report.reporter and counts[report.reporter] >= rate_limit.limit:
            limited.append(RejectedIn(
                raw=report.raw,
                reason=RATE_LIMITED,
                detail=f"reporter {report.reporter!r} already sent {counts[report.reporter]} reports within "
                f"{rate_limit.window_s:g} s (policy.reporter_rate_limit = {rate_limit.limit})",
                topic=report.topic,
                partition=report.partition,
                offset=report.offset,
            ))  # fmt: skip
            continue
        if report.reporter:
            counts[report.reporter] += 1
        kept.append(report)
    return kept, tuple(limited)


def _input_columns(report: ReportIn) -> tuple[str | None, str | None]:
    """(input, input_pair) columns of a report: the text as sent, and a pair's second text."""
    value = report.input
    if isinstance(value, tuple):
        return value[0], value[1]
    return value, None


def _ensure_mistakes(
    conn: Connection, sql: _Statements, fresh: Sequence[ReportIn], now: datetime
) -> tuple[dict[tuple[str, str], int], set[int]]:
    """Create missing mistakes; return {(model, fingerprint): id} and the ids just created."""
    first: dict[tuple[str, str], ReportIn] = {}
    for report in fresh:
        first.setdefault((report.model, report.fingerprint), report)
    by_model: dict[str, list[str]] = defaultdict(list)
    for model, fp in first:
        by_model[model].append(fp)
    ids: dict[tuple[str, str], int] = {}
    for model, fps in by_model.items():
        for start in range(0, len(fps), LOOKUP_CHUNK):
            found = conn.execute(sql.mistakes_by_key, {"model": model, "fps": fps[start : start + LOOKUP_CHUNK]})
            ids.update({(model, fp): mid for mid, fp in found})
    missing = sorted(key for key in first if key not in ids)
    if not missing:
        return ids, set()
    watermark = int(conn.scalar(sql.max_mistake_id) or 0)
    # counters start at 0: the reports are folded in afterwards, like those of existing mistakes
    rows = [
        (model, fp, first[(model, fp)].input_text, 0, 0, now, now, Status.REPORTED, now, 0, True)
        for model, fp in missing
    ]
    insert_many(conn, MISTAKES, MISTAKE_COLUMNS, rows, conflict=["model", "fingerprint"])
    created = {(model, fp): mid for mid, model, fp in conn.execute(sql.mistakes_after, {"watermark": watermark})}
    ids.update(created)
    return ids, set(created.values())


def record_rejected(conn: Connection, rejected: Sequence[RejectedIn], now: datetime) -> int:
    """Insert rejected events; a redelivered one (same topic/partition/offset) is skipped."""
    if not rejected:
        return 0
    rows = [
        {
            "raw": r.raw,
            "reason": r.reason,
            "detail": r.detail,
            "topic": r.topic,
            "kafka_partition": r.partition,
            "kafka_offset": r.offset,
            "received_at": now,
        }
        for r in sorted(rejected, key=lambda r: (r.topic, r.partition, r.offset))
    ]
    stmt = upsert_insert(conn.dialect.name, REJECTED).on_conflict_do_nothing(
        index_elements=["topic", "kafka_partition", "kafka_offset"]
    )
    return len(conn.execute(stmt.returning(REJECTED.c.id), rows).all())
