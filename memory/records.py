"""Plain records that cross the boundary between the daemon and the store."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class ReportIn:
    """One validated correction event, ready for `Store.record_batch`.

    `input_text` is the normalised input (memory.fingerprint.input_key form) and
    `fingerprint` is memory.fingerprint.fingerprint(model, input).
    """

    event_id: str
    model: str
    fingerprint: str
    input_text: str
    target: str
    raw: bytes
    topic: str
    partition: int
    offset: int
    reporter: str | None = None
    reported_at: datetime | None = None
    observed: str | None = None
    equivalents: tuple[str, ...] = field(default_factory=tuple)
    model_version: int | None = None


@dataclass(frozen=True)
class RejectedIn:
    """An event that failed validation; it goes to the DLQ and to the rejected table."""

    raw: bytes
    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
