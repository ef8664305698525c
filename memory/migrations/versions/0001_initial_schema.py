"""Initial schema: reports, mistakes (targets, reporters, status changes), patches, versions, rejected.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The statuses as of this revision (memory.lifecycle.Status), frozen here on purpose: a migration
# must mean the same thing whatever the code looks like later.
STATUSES = ("reported", "queued", "conflicting", "already_fixed", "patching", "patched",
            "gate_rejected", "failed", "revoked")  # fmt: skip

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UTC = sa.DateTime(timezone=True)


def status_column(name: str) -> sa.Column[str]:
    return sa.Column(name, sa.String(length=20), nullable=False)


def status_check(table: str, column: str) -> sa.CheckConstraint:
    values = ", ".join(f"'{status}'" for status in STATUSES)
    return sa.CheckConstraint(f"{column} IN ({values})", name=op.f(f"ck_{table}_{column}"))


def upgrade() -> None:
    op.create_table(
        "mistakes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("input_text", sa.Text(), nullable=False),
        sa.Column("target", sa.Text(), nullable=True),
        sa.Column("report_count", sa.Integer(), nullable=False),
        sa.Column("reporter_count", sa.Integer(), nullable=False),
        sa.Column("first_seen", UTC, nullable=False),
        sa.Column("last_seen", UTC, nullable=False),
        status_column("status"),
        sa.Column("status_changed_at", UTC, nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("needs_policy", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mistakes")),
        sa.UniqueConstraint("model", "fingerprint", name=op.f("uq_mistakes_model_fingerprint")),
        status_check("mistakes", "status"),
    )
    op.create_index("ix_mistakes_model_status", "mistakes", ["model", "status"])

    op.create_table(
        "mistake_targets",
        sa.Column("mistake_id", sa.Integer(), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["mistake_id"], ["mistakes.id"], ondelete="CASCADE",
                                name=op.f("fk_mistake_targets_mistake_id_mistakes")),
        sa.PrimaryKeyConstraint("mistake_id", "target", name=op.f("pk_mistake_targets")),
    )  # fmt: skip
    op.create_table(
        "mistake_reporters",
        sa.Column("mistake_id", sa.Integer(), nullable=False),
        sa.Column("reporter", sa.String(length=256), nullable=False),
        sa.ForeignKeyConstraint(["mistake_id"], ["mistakes.id"], ondelete="CASCADE",
                                name=op.f("fk_mistake_reporters_mistake_id_mistakes")),
        sa.PrimaryKeyConstraint("mistake_id", "reporter", name=op.f("pk_mistake_reporters")),
    )  # fmt: skip

    op.create_table(
        "reports",
        sa.Column("id", BigId, nullable=False),
        sa.Column("event_id", sa.String(length=256), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("mistake_id", sa.Integer(), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("observed", sa.Text(), nullable=True),
        sa.Column("equivalents", sa.JSON(), nullable=False),
        sa.Column("reporter", sa.String(length=256), nullable=True),
        sa.Column("reported_at", UTC, nullable=True),
        sa.Column("received_at", UTC, nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=True),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("topic", sa.String(length=249), nullable=False),
        sa.Column("kafka_partition", sa.Integer(), nullable=False),
        sa.Column("kafka_offset", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["mistake_id"], ["mistakes.id"], name=op.f("fk_reports_mistake_id_mistakes")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reports")),
        sa.UniqueConstraint("event_id", name=op.f("uq_reports_event_id")),
    )
    op.create_index("ix_reports_mistake_id", "reports", ["mistake_id"])
    op.create_index("ix_reports_model_received_at", "reports", ["model", "received_at"])

    op.create_table(
        "status_changes",
        sa.Column("id", BigId, nullable=False),
        sa.Column("mistake_id", sa.Integer(), nullable=False),
        status_column("from_status"),
        status_column("to_status"),
        sa.Column("at", UTC, nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["mistake_id"], ["mistakes.id"], ondelete="CASCADE",
                                name=op.f("fk_status_changes_mistake_id_mistakes")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_status_changes")),
        status_check("status_changes", "from_status"),
        status_check("status_changes", "to_status"),
    )  # fmt: skip
    op.create_index(op.f("ix_status_changes_mistake_id"), "status_changes", ["mistake_id"])

    op.create_table(
        "patches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("mistake_id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("neurons", sa.LargeBinary(), nullable=False),
        sa.Column("n_neurons", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("activation", sa.String(length=32), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("gate", sa.JSON(), nullable=False),
        sa.Column("accepted", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("removed_at", UTC, nullable=True),
        sa.Column("removed_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["mistake_id"], ["mistakes.id"], name=op.f("fk_patches_mistake_id_mistakes")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patches")),
    )
    op.create_index(op.f("ix_patches_mistake_id"), "patches", ["mistake_id"])
    op.create_index("ix_patches_model_accepted", "patches", ["model", "accepted"])

    op.create_table(
        "versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("parent", sa.Integer(), nullable=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("edit_ids", sa.JSON(), nullable=False),
        sa.Column("uri", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_versions")),
        sa.UniqueConstraint("model", "number", name=op.f("uq_versions_model_number")),
    )

    op.create_table(
        "rejected",
        sa.Column("id", BigId, nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("reason", sa.String(length=100), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("topic", sa.String(length=249), nullable=False),
        sa.Column("kafka_partition", sa.Integer(), nullable=False),
        sa.Column("kafka_offset", sa.BigInteger(), nullable=False),
        sa.Column("received_at", UTC, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rejected")),
        sa.UniqueConstraint("topic", "kafka_partition", "kafka_offset",
                            name=op.f("uq_rejected_topic_kafka_partition_kafka_offset")),
    )  # fmt: skip


def downgrade() -> None:
    # children before parents (foreign keys)
    for table in ("rejected", "versions", "patches", "status_changes", "reports", "mistake_reporters",
                  "mistake_targets", "mistakes"):  # fmt: skip
        op.drop_table(table)
