"""The tables: SQLAlchemy 2.0 typed models, identical on SQLite and PostgreSQL.

reports            one row per correction event; `event_id` UNIQUE makes redelivery a no-op
mistakes           one row per (model, fingerprint); its `id` is the patch neuron's edit id
mistake_targets    the targets reported for a mistake, with counts (conflict policy)
mistake_reporters  the distinct reporters of a mistake (quorum, priority)
status_changes     every status change, written by memory.lifecycle only
patches            every trained neuron, accepted or not, with its tensors and gate verdict
versions           published checkpoints (number, parent, manifest sha256, edit ids)
rejected           events that failed validation, with their original bytes
stuck_partitions   partitions the consumer could not read past (an undecodable record batch), one
                   row per episode, with the operator's skip or retry and what the daemon did

Timestamps are stored in UTC and always come back timezone-aware (`UTCDateTime`), because
SQLite has no time zones and mixing naive and aware datetimes fails at comparison time.
Changing anything here needs a new migration under memory/migrations/versions; the test
tests/test_memory_migrations.py fails until the migrated schema equals these models again.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from memory.status import Status

# Deterministic constraint names, so migrations can name what they alter on both backends.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets 64-bit ids for reports.
BigId = BigInteger().with_variant(Integer(), "sqlite")
# Kafka topic names are at most 249 characters
TOPIC_LEN = 249
# model names, event ids and reporters are identifiers, not prose; 256 bounds index size
NAME_LEN = 256


class UTCDateTime(TypeDecorator[datetime]):
    """A DateTime that refuses naive values and always returns aware UTC datetimes."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: patchd stores timezone-aware UTC times only")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


StatusType = Enum(
    Status,
    native_enum=False,  # a VARCHAR: adding a status is a plain migration on both backends
    create_constraint=False,  # status_check() adds a named CHECK instead (one per column)
    length=20,
    validate_strings=True,  # an unknown status string fails in Python, before the database
    values_callable=lambda enum: [member.value for member in enum],  # store "queued", not "QUEUED"
)


def status_check(column: str) -> CheckConstraint:
    """CHECK (column IN (...statuses)), named ck_<table>_<column>; a migration must repeat it."""
    values = ", ".join(f"'{status.value}'" for status in Status)
    return CheckConstraint(f"{column} IN ({values})", name=column)


class Mistake(Base):
    __tablename__ = "mistakes"
    __table_args__ = (
        UniqueConstraint("model", "fingerprint"),
        Index("ix_mistakes_model_status", "model", "status"),
        status_check("status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # the edit id of its patch neurons
    model: Mapped[str] = mapped_column(String(NAME_LEN))
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 hex of model + normalised input
    input_text: Mapped[str] = mapped_column(Text)  # normalised input (memory.fingerprint.input_key)
    target: Mapped[str | None] = mapped_column(Text)  # the winning target, set when queued
    report_count: Mapped[int] = mapped_column(Integer, default=0)
    reporter_count: Mapped[int] = mapped_column(Integer, default=0)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    status: Mapped[Status] = mapped_column(StatusType, default=Status.REPORTED)
    status_changed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # operator override that sorts before reporter count (0 for every reported mistake)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # set by record_batch when counts change, cleared when the policy has looked at them
    needs_policy: Mapped[bool] = mapped_column(Boolean, default=True)
    # the operator who approved or dismissed it when it was held for review: never held again
    reviewed_by: Mapped[str | None] = mapped_column(String(NAME_LEN))


class MistakeTarget(Base):
    __tablename__ = "mistake_targets"

    mistake_id: Mapped[int] = mapped_column(ForeignKey("mistakes.id", ondelete="CASCADE"), primary_key=True)
    target: Mapped[str] = mapped_column(Text, primary_key=True)
    count: Mapped[int] = mapped_column(Integer)


class MistakeReporter(Base):
    __tablename__ = "mistake_reporters"

    mistake_id: Mapped[int] = mapped_column(ForeignKey("mistakes.id", ondelete="CASCADE"), primary_key=True)
    # "" stands for anonymous: unauthenticated reports count as one voice, not as many
    reporter: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)


class Report(Base):
    __tablename__ = "reports"
    __table_args__ = (
        Index("ix_reports_model_received_at", "model", "received_at"),
        Index("ix_reports_mistake_id", "mistake_id"),
        # the reporter rate limit and reporters' first reports (memory/ingest.py, memory/policy.py)
        Index("ix_reports_model_reporter_received_at", "model", "reporter", "received_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    model: Mapped[str] = mapped_column(String(NAME_LEN))
    mistake_id: Mapped[int] = mapped_column(ForeignKey("mistakes.id"))
    target: Mapped[str] = mapped_column(Text)
    observed: Mapped[str | None] = mapped_column(Text)
    equivalents: Mapped[list[str]] = mapped_column(JSON)
    # the input as the producer sent it (not normalised): what the worker trains on; a text pair's
    # second text in input_pair. NULL only in rows stored before revision 0002 that it could not read
    input: Mapped[str | None] = mapped_column(Text)
    input_pair: Mapped[str | None] = mapped_column(Text)
    reporter: Mapped[str | None] = mapped_column(String(NAME_LEN))
    reported_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # the client's claim; untrusted
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)  # our clock; used for age and rates
    model_version: Mapped[int | None] = mapped_column(Integer)
    raw: Mapped[bytes] = mapped_column(LargeBinary)  # the original Kafka value, for audits and replays
    topic: Mapped[str] = mapped_column(String(TOPIC_LEN))
    kafka_partition: Mapped[int] = mapped_column(Integer)
    kafka_offset: Mapped[int] = mapped_column(BigInteger)


class StatusChange(Base):
    __tablename__ = "status_changes"
    __table_args__ = (status_check("from_status"), status_check("to_status"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    mistake_id: Mapped[int] = mapped_column(ForeignKey("mistakes.id", ondelete="CASCADE"), index=True)
    from_status: Mapped[Status] = mapped_column(StatusType)
    to_status: Mapped[Status] = mapped_column(StatusType)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    note: Mapped[str | None] = mapped_column(Text)


class Patch(Base):
    __tablename__ = "patches"
    __table_args__ = (Index("ix_patches_model_accepted", "model", "accepted"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # acceptance order = id order
    mistake_id: Mapped[int] = mapped_column(ForeignKey("mistakes.id"), index=True)
    model: Mapped[str] = mapped_column(String(NAME_LEN))
    neurons: Mapped[bytes] = mapped_column(LargeBinary)  # safetensors: keys [n,d], biases [n], values [n,d]
    n_neurons: Mapped[int] = mapped_column(Integer)
    layer: Mapped[int] = mapped_column(Integer)
    activation: Mapped[str] = mapped_column(String(32))
    steps: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(Float)
    gate: Mapped[dict[str, Any]] = mapped_column(JSON)  # the gate's metrics and verdict, as reported
    accepted: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    removed_reason: Mapped[str | None] = mapped_column(Text)
    # the first published version that carried it (Store.add_version sets it once): provenance
    first_version: Mapped[int | None] = mapped_column(Integer)


class Version(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("model", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(NAME_LEN))
    number: Mapped[int] = mapped_column(Integer)
    parent: Mapped[int | None] = mapped_column(Integer)  # the version number it was built on
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    edit_ids: Mapped[list[int]] = mapped_column(JSON)  # mistake ids whose neurons it holds, in order
    uri: Mapped[str | None] = mapped_column(Text)


class Rejected(Base):
    __tablename__ = "rejected"
    # one row per Kafka record: a redelivered invalid event is not stored twice
    __table_args__ = (UniqueConstraint("topic", "kafka_partition", "kafka_offset"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    reason: Mapped[str] = mapped_column(String(100))  # machine-readable, e.g. "missing_field"
    detail: Mapped[str] = mapped_column(Text)
    topic: Mapped[str] = mapped_column(String(TOPIC_LEN))
    kafka_partition: Mapped[int] = mapped_column(Integer)
    kafka_offset: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)


# the operator's commands for a stuck partition (memory/stuck.py carries them out through the daemon)
STUCK_COMMANDS = ("skip", "retry")


class StuckPartition(Base):
    __tablename__ = "stuck_partitions"
    __table_args__ = (
        Index("ix_stuck_partitions_model_resolved_at", "model", "resolved_at"),
        CheckConstraint("command IN ('skip', 'retry')", name="command"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(NAME_LEN))
    topic: Mapped[str] = mapped_column(String(TOPIC_LEN))
    kafka_partition: Mapped[int] = mapped_column(Integer)
    kafka_offset: Mapped[int] = mapped_column(BigInteger)  # the first offset the consumer cannot decode
    error: Mapped[str] = mapped_column(Text)  # the client's exception, e.g. "CorruptRecordError(...)"
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    # set by `patchd kafka skip|retry`; the daemon carries it out and resolves the row
    command: Mapped[str | None] = mapped_column(String(16))
    operator: Mapped[str | None] = mapped_column(String(NAME_LEN))
    reason: Mapped[str | None] = mapped_column(Text)  # the operator's words
    commanded_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    resolution: Mapped[str | None] = mapped_column(Text)  # what was done: "skipped offsets 5..9 (5)", ...
