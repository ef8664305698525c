"""A mistake's statuses, the table of legal transitions, and the only code that changes a status.

```
reported ──► queued ──► patching ──► patched ──► revoked
   │  │        ▲  │         │
   │  │        │  ▼         ├──► already_fixed   (the frozen forward is already right)
   │  └──► conflicting      ├──► gate_rejected   (every try failed the gate) ──► queued (retry)
   │           │            ├──► failed          (an error, not a verdict)   ──► queued (retry)
   │           ▼            └──► queued          (crash recovery: the neuron was never kept)
   └──────► held ──► queued    (an operator approves: `patchd review approve`)
              └────► dismissed (an operator rejects it) ──► queued (approved after all)
```

`transition()` checks the table and raises `IllegalTransition` before it touches the row, and
records every change in `status_changes`, so the history of a mistake can be audited. Nothing
else in patchd assigns `Mistake.status` (rq's `set_state` / `job_lifecycle.py` pattern).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.orm import Session

from memory.schema import Mistake, StatusChange
from memory.status import OPEN, Status

__all__ = ["OPEN", "TRANSITIONS", "IllegalTransition", "Status", "is_legal", "transition"]


TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.REPORTED: frozenset({Status.QUEUED, Status.CONFLICTING, Status.HELD}),
    # queued -> conflicting: later reports disagree before the worker got to it
    Status.QUEUED: frozenset({Status.PATCHING, Status.CONFLICTING, Status.HELD}),
    Status.CONFLICTING: frozenset({Status.QUEUED, Status.HELD}),
    # only an operator moves these (memory/review.py)
    Status.HELD: frozenset({Status.QUEUED, Status.DISMISSED}),
    Status.DISMISSED: frozenset({Status.QUEUED}),
    Status.PATCHING: frozenset(
        {
            Status.PATCHED,
            Status.ALREADY_FIXED,
            Status.GATE_REJECTED,
            Status.FAILED,
            Status.QUEUED,  # crash recovery, and a warm stop that gives the mistake back
        }
    ),
    Status.PATCHED: frozenset({Status.REVOKED}),
    # an operator (or a changed model) may send these back to the queue
    Status.GATE_REJECTED: frozenset({Status.QUEUED}),
    Status.FAILED: frozenset({Status.QUEUED}),
    Status.ALREADY_FIXED: frozenset({Status.QUEUED}),
    Status.REVOKED: frozenset({Status.QUEUED}),
}


class IllegalTransition(ValueError):
    """A status change that the table does not allow."""

    def __init__(self, mistake_id: int, current: Status, wanted: Status) -> None:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "none"
        super().__init__(
            f"mistake {mistake_id}: illegal status change {current} -> {wanted} (from {current} only: {allowed})"
        )
        self.mistake_id = mistake_id
        self.current = current
        self.wanted = wanted


def is_legal(current: Status, wanted: Status) -> bool:
    return wanted in TRANSITIONS[current]


def transition(session: Session, mistake: Mistake, wanted: Status, note: str | None = None) -> None:
    """Move `mistake` (a row loaded in `session`'s open write transaction) to `wanted`.

    The caller owns the transaction, so a status change commits together with whatever caused
    it (an accepted patch, a removed neuron) or not at all.
    """
    current = Status(mistake.status)
    if not is_legal(current, wanted):
        raise IllegalTransition(mistake.id, current, wanted)
    now = datetime.now(UTC)
    mistake.status = wanted
    mistake.status_changed_at = now
    session.add(StatusChange(mistake_id=mistake.id, from_status=current, to_status=wanted, at=now, note=note))
