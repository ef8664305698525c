"""Read-only counts for the operator and the consumer: `patchd status`, /metrics, backpressure.

Functions over an open session; memory/store.py wraps each in a read transaction.
"""

from __future__ import annotations

from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import Session

from memory import stuck
from memory.records import StatusSummary
from memory.schema import Mistake, Patch, Rejected, Report, Version
from memory.status import Status


def status_counts(session: Session, model: str) -> dict[Status, int]:
    """Mistakes per status, with every status present (0 when none)."""
    rows = session.execute(select(Mistake.status, func.count()).where(Mistake.model == model).group_by(Mistake.status))
    counts = dict.fromkeys(Status, 0)
    counts.update({Status(status): n for status, n in rows})
    return counts


def backlog(session: Session, model: str, quorum: int) -> int:
    """Mistakes waiting for the worker: queued, or reported by enough distinct reporters to be queued.

    A `reported` mistake below quorum is not work (it may never be), so it does not count.
    """
    waiting = or_(
        Mistake.status == Status.QUEUED,
        (Mistake.status == Status.REPORTED) & (Mistake.reporter_count >= quorum),
    )
    return int(session.scalar(select(func.count()).select_from(Mistake).where(Mistake.model == model, waiting)) or 0)


def status_summary(session: Session, model: str, quorum: int) -> StatusSummary:
    """What `patchd status` prints, in one read transaction."""

    def count(query: Select[int]) -> int:
        return int(session.scalar(query) or 0)

    kept = (Patch.model == model) & Patch.accepted.is_(True) & Patch.removed_at.is_(None)
    latest = session.scalar(select(func.max(Version.number)).where(Version.model == model))
    return StatusSummary(
        model=model,
        reports=count(select(func.count()).select_from(Report).where(Report.model == model)),
        rejected=count(select(func.count()).select_from(Rejected)),  # every rejected event was dead-lettered too
        mistakes={str(k): v for k, v in status_counts(session, model).items()},
        patches=count(select(func.count()).select_from(Patch).where(kept)),
        patch_tries=count(select(func.count()).select_from(Patch).where(Patch.model == model)),
        backlog=backlog(session, model, quorum),
        last_version=None if latest is None else int(latest),
        stuck_partitions=[record.as_dict() for record in stuck.listed(session, model)],
    )
