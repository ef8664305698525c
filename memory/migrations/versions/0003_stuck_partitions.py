"""Trust and faults (issue 23):
- stuck_partitions: where the consumer cannot decode a record batch, and the operator's answer;
- reports get an index on (model, reporter, received_at): the reporter rate limit and probation;
- mistakes can be held for review and dismissed (statuses "held", "dismissed", and who reviewed);
- patches remember the first version that carried them (provenance), filled for existing
  databases from the versions' edit lists.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# the statuses as of this revision, frozen here on purpose (see 0001)
OLD_STATUSES = ("reported", "queued", "conflicting", "already_fixed", "patching", "patched",
                "gate_rejected", "failed", "revoked")  # fmt: skip
STATUSES = (*OLD_STATUSES, "held", "dismissed")
STATUS_COLUMNS = (("mistakes", "status"), ("status_changes", "from_status"), ("status_changes", "to_status"))

# as in 0001: timezone-aware; memory/schema.py's UTCDateTime converts on the way in and out
UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "stuck_partitions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("topic", sa.String(length=249), nullable=False),
        sa.Column("kafka_partition", sa.Integer(), nullable=False),
        sa.Column("kafka_offset", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("first_seen", UTC, nullable=False),
        sa.Column("last_seen", UTC, nullable=False),
        sa.Column("command", sa.String(length=16), nullable=True),
        sa.Column("operator", sa.String(length=256), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("commanded_at", UTC, nullable=True),
        sa.Column("resolved_at", UTC, nullable=True),
        sa.Column("resolution", sa.Text(), nullable=True),
        sa.CheckConstraint("command IN ('skip', 'retry')", name=op.f("ck_stuck_partitions_command")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stuck_partitions")),
    )
    op.create_index("ix_stuck_partitions_model_resolved_at", "stuck_partitions", ["model", "resolved_at"], unique=False)
    op.create_index(
        "ix_reports_model_reporter_received_at", "reports", ["model", "reporter", "received_at"], unique=False
    )
    _status_checks(STATUSES)
    with op.batch_alter_table("mistakes") as batch:
        batch.add_column(sa.Column("reviewed_by", sa.String(length=256), nullable=True))
    with op.batch_alter_table("patches") as batch:
        batch.add_column(sa.Column("first_version", sa.Integer(), nullable=True))
    _fill_first_versions()


def _fill_first_versions() -> None:
    """Each accepted patch's first version: the oldest version (by number) created after the patch
    whose edit list holds its mistake. Versions are few (a publish every few seconds at most)."""
    versions = sa.table(
        "versions", sa.column("model"), sa.column("number"), sa.column("created_at"), sa.column("edit_ids", sa.JSON())
    )
    patches = sa.table(
        "patches",
        sa.column("id"),
        sa.column("model"),
        sa.column("mistake_id"),
        sa.column("accepted"),
        sa.column("created_at"),
        sa.column("first_version"),
    )
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(versions.c.model, versions.c.number, versions.c.created_at, versions.c.edit_ids).order_by(
            versions.c.model, versions.c.number
        )
    ).all()
    for model, number, created_at, edit_ids in rows:
        if isinstance(edit_ids, str):  # SQLite hands JSON back as text through a lightweight table
            edit_ids = json.loads(edit_ids)
        for start in range(0, len(edit_ids or []), 500):
            conn.execute(
                patches.update()
                .where(
                    patches.c.model == model,
                    patches.c.accepted.is_(True),
                    patches.c.first_version.is_(None),
                    patches.c.created_at <= created_at,
                    patches.c.mistake_id.in_(edit_ids[start : start + 500]),
                )
                .values(first_version=number)
            )


def _status_checks(statuses: tuple[str, ...]) -> None:
    """Replace the CHECK (status IN (...)) of every status column (SQLite: batch mode copies the table)."""
    values = ", ".join(f"'{status}'" for status in statuses)
    for table in ("mistakes", "status_changes"):
        with op.batch_alter_table(table) as batch:
            for name, column in STATUS_COLUMNS:
                if name == table:
                    batch.drop_constraint(op.f(f"ck_{table}_{column}"), type_="check")
                    batch.create_check_constraint(op.f(f"ck_{table}_{column}"), f"{column} IN ({values})")


def downgrade() -> None:
    with op.batch_alter_table("patches") as batch:
        batch.drop_column("first_version")
    with op.batch_alter_table("mistakes") as batch:
        batch.drop_column("reviewed_by")
    _status_checks(OLD_STATUSES)
    op.drop_index("ix_reports_model_reporter_received_at", table_name="reports")
    op.drop_index("ix_stuck_partitions_model_resolved_at", table_name="stuck_partitions")
    op.drop_table("stuck_partitions")
