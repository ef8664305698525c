"""Mistakes held for an operator's review (memory/policy.py holds them), and the operator's verdict.

    patchd review list                 held mistakes: input, target, reporters, why held
    patchd review approve ID --by NAME queued for the worker; never held again
    patchd review dismiss ID --by NAME never patched (approve later reverses it)

Each verdict is a status change with a note naming the operator and the reason, in
status_changes (memory/lifecycle.py), so the history says who let what through.
Functions over an open session; memory/store.py wraps each in a transaction.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from memory import lifecycle
from memory.schema import Mistake
from memory.status import Status


class NotReviewable(ValueError):
    """The mistake is not held (or dismissed), or belongs to another model."""


def held(session: Session, model: str, dismissed: bool = False) -> list[Mistake]:
    statuses = [Status.HELD, Status.DISMISSED] if dismissed else [Status.HELD]
    query = select(Mistake).where(Mistake.model == model, Mistake.status.in_(statuses))
    return list(session.scalars(query.order_by(Mistake.status_changed_at, Mistake.id)))


def decide(session: Session, model: str, mistake_id: int, approve: bool, operator: str, reason: str | None) -> Mistake:
    mistake = session.get(Mistake, mistake_id, with_for_update={"key_share": True})
    if mistake is None or mistake.model != model:
        raise NotReviewable(f"mistake {mistake_id} is not a mistake of model {model!r}")
    allowed = (Status.HELD, Status.DISMISSED) if approve else (Status.HELD,)
    if Status(mistake.status) not in allowed:
        raise NotReviewable(
            f"mistake {mistake_id} is {mistake.status}, not {' or '.join(allowed)}: nothing to "
            f"{'approve' if approve else 'dismiss'}"
        )
    mistake.reviewed_by = operator
    mistake.needs_policy = False  # the verdict stands; later reports only add to its counts
    verdict = "approved" if approve else "dismissed"
    note = f"{verdict} by {operator}" + (f": {reason}" if reason else "")
    lifecycle.transition(session, mistake, Status.QUEUED if approve else Status.DISMISSED, note=note)
    return mistake
