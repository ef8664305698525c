"""The policy inputs the worker needs: which mistake to patch next, and what its target is.

A mistake becomes eligible once `quorum` distinct reporters reported it. Its target is the
reported target with the largest count, but only if that count's share of all its reports is
strictly above `conflict_share` and no other target ties it; otherwise reporters disagree and
the mistake is `conflicting` until later reports settle it. Eligible mistakes are patched by
operator priority, then distinct reporters (many people hit it), then age (first seen), then id.

Only mistakes whose reports changed since the policy last looked (`needs_policy`) are
re-evaluated, so each call costs in proportion to what arrived, not to the backlog. A changed
`conflict_share` therefore applies to a queued or conflicting mistake at its next report.

Probation (`probation_s` > 0, for public feedback): a reporter is established once its first
report for the model is older than `probation_s`. A mistake at quorum whose winning target no
established reporter sent is `held` for an operator's review instead of queued (memory/review.py),
so a crowd of fresh names (30 sybils agreeing on a wrong "correction") cannot reach the model
alone. A mistake an operator reviewed is never held again.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from sqlalchemy import exists, select
from sqlalchemy.orm import Session, aliased

from memory import lifecycle
from memory.fingerprint import InputValue, input_from_key
from memory.lifecycle import OPEN, Status
from memory.schema import Mistake, MistakeTarget, Report


def check_policy(quorum: int, conflict_share: float) -> None:
    if quorum < 1:
        raise ValueError(f"quorum must be at least 1 distinct reporter, got {quorum}")
    if not 0.0 <= conflict_share < 1.0:
        raise ValueError(f"conflict_share must be in [0, 1): the winner's share must be above it, got {conflict_share}")


def decide_target(targets: Mapping[str, int], conflict_share: float) -> str | None:
    """The winning target, or None when no target is strictly above the share (or two tie)."""
    total = sum(targets.values())
    if total == 0:
        return None
    ranked = sorted(targets.items(), key=lambda item: (-item[1], item[0]))
    best, best_count = ranked[0]
    if len(ranked) > 1 and ranked[1][1] == best_count:
        return None
    return best if best_count / total > conflict_share else None


def targets_of(session: Session, mistake_ids: list[int]) -> dict[int, dict[str, int]]:
    found: dict[int, dict[str, int]] = defaultdict(dict)
    for start in range(0, len(mistake_ids), 500):
        rows = session.execute(
            select(MistakeTarget.mistake_id, MistakeTarget.target, MistakeTarget.count).where(
                MistakeTarget.mistake_id.in_(mistake_ids[start : start + 500])
            )
        )
        for mid, target, count in rows:
            found[mid][target] = count
    return found


def resolve(session: Session, model: str, quorum: int, conflict_share: float, probation_s: float = 0.0) -> int:
    """Queue, hold or mark conflicting every changed open mistake at quorum; return how many it looked at."""
    cutoff = datetime.now(UTC) - timedelta(seconds=probation_s)
    candidates = list(
        session.scalars(
            select(Mistake)
            .where(
                Mistake.model == model,
                Mistake.status.in_(OPEN),
                Mistake.needs_policy.is_(True),
                Mistake.reporter_count >= quorum,
            )
            .order_by(Mistake.id)  # lock order, see memory/ingest.py
            .with_for_update(key_share=True)
        )
    )
    targets = targets_of(session, [m.id for m in candidates])
    for mistake in candidates:
        winner = decide_target(targets.get(mistake.id, {}), conflict_share)
        mistake.needs_policy = False
        if winner is None:
            mistake.target = None
            if mistake.status != Status.CONFLICTING:
                lifecycle.transition(session, mistake, Status.CONFLICTING, note=_share_note(targets[mistake.id]))
            continue
        mistake.target = winner
        on_probation = probation_s > 0 and mistake.reviewed_by is None
        if on_probation and not _established(session, model, mistake.id, winner, cutoff):
            lifecycle.transition(
                session,
                mistake,
                Status.HELD,
                note=f"held for review: none of the {mistake.reporter_count} reporters of target {winner!r} reported "
                f"before {cutoff:%Y-%m-%d %H:%M:%S} UTC (policy.reporter_probation_s = {probation_s:g})",
            )
            continue
        if mistake.status != Status.QUEUED:
            lifecycle.transition(session, mistake, Status.QUEUED, note=f"target {winner!r}")
    return len(candidates)


def _established(session: Session, model: str, mistake_id: int, target: str, cutoff: datetime) -> bool:
    """Did a named reporter whose first report for `model` came before `cutoff` report `target` for
    the mistake? (Uses ix_reports_model_reporter_received_at for the earlier report.)"""
    earlier = aliased(Report)
    found = session.scalar(
        select(Report.id)
        .where(Report.mistake_id == mistake_id, Report.target == target, Report.reporter.is_not(None))
        .where(Report.reporter != "")
        .where(
            exists().where(earlier.model == model, earlier.reporter == Report.reporter, earlier.received_at < cutoff)
        )
        .limit(1)
    )
    return found is not None


def pick(session: Session, model: str) -> Mistake | None:
    """The queued mistake to patch first, locked (other workers skip it on PostgreSQL)."""
    return session.scalars(
        select(Mistake)
        .where(Mistake.model == model, Mistake.status == Status.QUEUED)
        .order_by(Mistake.priority.desc(), Mistake.reporter_count.desc(), Mistake.first_seen, Mistake.id)
        .limit(1)
        .with_for_update(skip_locked=True, key_share=True)
    ).first()


def equivalents_of(session: Session, mistake_id: int, target: str | None) -> tuple[str, ...]:
    """Distinct paraphrases sent with reports of the winning target, in the order first seen."""
    rows = session.scalars(
        select(Report.equivalents).where(Report.mistake_id == mistake_id, Report.target == target).order_by(Report.id)
    )
    seen: dict[str, None] = {}
    for equivalents in rows:
        for text in equivalents or ():
            seen.setdefault(text, None)
    return tuple(seen)


def input_of(session: Session, mistake: Mistake) -> InputValue:
    """What a patch for `mistake` trains on: the first report's input as sent (of the winning target
    once there is one); the normalised key when no stored report carries its input."""
    query = select(Report.input, Report.input_pair).where(Report.mistake_id == mistake.id)
    if mistake.target is not None:
        query = query.where(Report.target == mistake.target)
    row = session.execute(query.where(Report.input.is_not(None)).order_by(Report.id).limit(1)).first()
    if row is not None:
        text, pair = row
        assert text is not None  # the query skips reports without an input
        return text if pair is None else (text, pair)
    return input_from_key(mistake.input_text)


def _share_note(targets: Mapping[str, int]) -> str:
    total = sum(targets.values()) or 1
    parts = ", ".join(f"{t!r}: {n} ({n / total:.0%})" for t, n in sorted(targets.items(), key=lambda i: -i[1])[:5])
    return f"no target above the share: {parts}"
