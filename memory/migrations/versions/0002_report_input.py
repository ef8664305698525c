"""Reports keep their input as sent: `input` and, for a text pair, `input_pair`.

The worker trains on the first report's input exactly as the producer sent it (the mistake keeps
only the normalised key). Before this revision that input was re-read from the stored event
bytes at patch time; rows stored before it are filled here from those bytes, and a row whose
bytes cannot be read keeps NULL (the store then falls back to the mistake's normalised key).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# rows read and updated per round trip while filling the new columns of an existing database
BATCH = 1000


def upgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.add_column(sa.Column("input", sa.Text(), nullable=True))
        batch.add_column(sa.Column("input_pair", sa.Text(), nullable=True))
    reports = sa.table(
        "reports",
        sa.column("id", sa.Integer()),
        sa.column("raw", sa.LargeBinary()),
        sa.column("input", sa.Text()),
        sa.column("input_pair", sa.Text()),
    )
    conn = op.get_bind()
    last = 0
    while True:
        rows = conn.execute(
            sa.select(reports.c.id, reports.c.raw).where(reports.c.id > last).order_by(reports.c.id).limit(BATCH)
        ).all()
        if not rows:
            break
        last = rows[-1][0]
        values = [{"rid": rid, "text": text, "pair": pair} for rid, raw in rows for text, pair in [_input_of(raw)]]
        conn.execute(
            reports.update()
            .where(reports.c.id == sa.bindparam("rid"))
            .values(input=sa.bindparam("text"), input_pair=sa.bindparam("pair")),
            values,
        )


def downgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.drop_column("input_pair")
        batch.drop_column("input")


def _input_of(raw: bytes | None) -> tuple[str | None, str | None]:
    """The event's `input` as it was validated when it arrived: a text, or {"text", "text_pair"}."""
    try:
        value: Any = json.loads(bytes(raw or b"").decode("utf-8-sig"))["input"]
    except (ValueError, KeyError, TypeError):
        return None, None
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        pair = value.get("text_pair")
        return value["text"], pair if isinstance(pair, str) else None
    return None, None
