"""Stuck partitions: where the consumer cannot decode a record batch, and the operator's answer.

A record batch the Kafka client cannot decode (corrupt bytes, a codec it does not have) fails
every poll of its partition, before any of its records reach the daemon. The consumer stops
reading that partition only, records the episode here, and goes on with the others. The episode
stays open, visible in `patchd status`, /readyz and /metrics, until an operator decides:

    patchd kafka skip --partition P --offset O   the daemon moves past the undecodable records
    patchd kafka retry --partition P             the daemon reads the partition again (a codec
                                                 library installed, a broker fixed)

The command is written to the open row (who, when, why); the daemon carries it out at its next
round and resolves the row with what it did. Rows are never deleted: they are the record.
Functions over an open session; memory/store.py wraps each in a transaction.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from memory.records import StuckRecord
from memory.schema import STUCK_COMMANDS, StuckPartition

# stored error texts are bounded: a client's exception can carry a whole record batch in its repr
ERROR_CHARS = 1000


class NoStuckPartition(LookupError):
    """No open stuck-partition episode matches the operator's command."""


def _open(session: Session, model: str, topic: str, partition: int) -> StuckPartition | None:
    return session.scalar(
        select(StuckPartition)
        .where(
            StuckPartition.model == model,
            StuckPartition.topic == topic,
            StuckPartition.kafka_partition == partition,
            StuckPartition.resolved_at.is_(None),
        )
        .order_by(StuckPartition.id.desc())
        .limit(1)
        .with_for_update(key_share=True)
    )


def record(
    session: Session, model: str, topic: str, partition: int, offset: int, error: str, now: datetime
) -> StuckRecord:
    """The open episode of this partition at this offset, created or refreshed (a restart that
    sticks at the same offset continues the episode, so a command given meanwhile still applies).
    An open episode at another offset is resolved as superseded: a command given for it must not
    apply to different records."""
    row = _open(session, model, topic, partition)
    if row is not None and row.kafka_offset != offset:
        row.resolved_at, row.resolution = now, f"superseded: the partition is now stuck at offset {offset}"
        row = None
    if row is None:
        row = StuckPartition(model=model, topic=topic, kafka_partition=partition, kafka_offset=offset,
                             error=error[:ERROR_CHARS], first_seen=now, last_seen=now)  # fmt: skip
        session.add(row)
    else:
        row.last_seen, row.error = now, error[:ERROR_CHARS]
    session.flush()
    return _record(row)


def command(
    session: Session,
    model: str,
    topic: str,
    partition: int,
    action: str,
    operator: str,
    reason: str | None,
    offset: int | None,
    now: datetime,
) -> StuckRecord:
    """Write an operator's skip or retry to the open episode; the daemon carries it out.

    `offset`, when given, must be the stuck offset: a skip names the records it gives up.
    """
    if action not in STUCK_COMMANDS:
        raise ValueError(f"unknown command {action!r}: expected one of {', '.join(STUCK_COMMANDS)}")
    row = _open(session, model, topic, partition)
    if row is None:
        raise NoStuckPartition(f"{topic}[{partition}] of model {model!r} is not stuck (see `patchd status`)")
    if offset is not None and offset != row.kafka_offset:
        raise NoStuckPartition(
            f"{topic}[{partition}] is stuck at offset {row.kafka_offset}, not {offset}: check `patchd status`"
        )
    row.command, row.operator, row.reason, row.commanded_at = action, operator, reason, now
    session.flush()
    return _record(row)


def resolve(session: Session, stuck_id: int, resolution: str, now: datetime) -> None:
    row = session.get(StuckPartition, stuck_id, with_for_update={"key_share": True})
    if row is not None and row.resolved_at is None:
        row.resolved_at, row.resolution = now, resolution


def listed(session: Session, model: str, open_only: bool = True) -> list[StuckRecord]:
    """Open episodes (or all, newest last) of the model."""
    query = select(StuckPartition).where(StuckPartition.model == model)
    if open_only:
        query = query.where(StuckPartition.resolved_at.is_(None))
    return [_record(row) for row in session.scalars(query.order_by(StuckPartition.id))]


def _record(row: StuckPartition) -> StuckRecord:
    return StuckRecord(
        id=row.id,
        model=row.model,
        topic=row.topic,
        partition=row.kafka_partition,
        offset=row.kafka_offset,
        error=row.error,
        first_seen=row.first_seen,
        last_seen=row.last_seen,
        command=row.command,
        operator=row.operator,
        reason=row.reason,
        commanded_at=row.commanded_at,
        resolved_at=row.resolved_at,
        resolution=row.resolution,
    )
