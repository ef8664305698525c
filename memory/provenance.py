"""What stands behind each patch: the mistake, its target and input, the reports and reporters.

Published with the neurons (each segment's metadata, daemon/publisher.py), so that `patchd why`
and a downstream service (patching/provenance.py) can say which corrections shape an answer, and
who sent them, without access to this database. Functions over an open session; memory/store.py
wraps each in a read transaction.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from memory import policy
from memory.schema import Mistake, MistakeReporter, Patch

# reporter names per patch in a published version: enough to see who, bounded for a crowd
MAX_REPORTERS = 20
# ids per IN (...) lookup
CHUNK = 500


def of_patches(session: Session, patch_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """{patch id: provenance} for the patches that exist among `patch_ids`.

    reporters: up to MAX_REPORTERS distinct names, sorted ("" is anonymous); reporter_count the
    full count. first_version: None until a version carrying the patch is recorded.
    """
    out: dict[int, dict[str, Any]] = {}
    ids = list(patch_ids)
    for start in range(0, len(ids), CHUNK):
        rows = session.execute(
            select(Patch, Mistake)
            .join(Mistake, Mistake.id == Patch.mistake_id)
            .where(Patch.id.in_(ids[start : start + CHUNK]))
        ).all()
        mistake_ids = sorted({mistake.id for _, mistake in rows})
        reporters: dict[int, list[str]] = defaultdict(list)
        for mid, name in session.execute(
            select(MistakeReporter.mistake_id, MistakeReporter.reporter)
            .where(MistakeReporter.mistake_id.in_(mistake_ids))
            .order_by(MistakeReporter.mistake_id, MistakeReporter.reporter)
        ):
            if len(reporters[mid]) < MAX_REPORTERS:
                reporters[mid].append(name)
        for patch, mistake in rows:
            value = policy.input_of(session, mistake)
            out[patch.id] = {
                "patch_id": patch.id,
                "mistake_id": mistake.id,
                "target": mistake.target,
                "input": list(value) if isinstance(value, tuple) else value,
                "reporters": reporters[mistake.id],
                "reporter_count": mistake.reporter_count,
                "report_count": mistake.report_count,
                "first_seen": mistake.first_seen.isoformat(),
                "accepted_at": patch.created_at.isoformat(),
                "first_version": patch.first_version,
            }
    return out
