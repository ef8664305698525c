"""10,000 deliveries with 30% redeliveries and 20% recurring mistakes: exact counts, both backends."""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import select

from daemon.tools.bench_store import Expected, synthetic_stream
from memory.schema import Mistake, MistakeReporter, MistakeTarget
from memory.store import Store


def _stored(store: Store) -> tuple[dict[str, int], dict[str, dict[str, int]], dict[str, int], dict[str, int]]:
    """Per fingerprint: report counts, target counts, reporter_count column, distinct reporter rows."""
    with store._reading() as session:
        mistakes = {
            mid: (fp, n, r)
            for mid, fp, n, r in session.execute(
                select(Mistake.id, Mistake.fingerprint, Mistake.report_count, Mistake.reporter_count)
            )
        }
        targets: dict[str, dict[str, int]] = defaultdict(dict)
        for mid, target, count in session.execute(
            select(MistakeTarget.mistake_id, MistakeTarget.target, MistakeTarget.count)
        ):
            targets[mistakes[mid][0]][target] = count
        reporter_rows: dict[str, int] = defaultdict(int)
        for (mid,) in session.execute(select(MistakeReporter.mistake_id)):
            reporter_rows[mistakes[mid][0]] += 1
    reports = {fp: n for fp, n, _ in mistakes.values()}
    reporters = {fp: r for fp, _, r in mistakes.values()}
    return reports, dict(targets), reporters, dict(reporter_rows)


def _check(store: Store, expected: Expected) -> None:
    counts = store.table_counts()
    assert counts["reports"] == expected.reports == 7_000
    assert counts["mistakes"] == expected.mistakes == 5_600
    reports, targets, reporters, reporter_rows = _stored(store)
    assert reports == expected.report_counts
    assert targets == {fp: dict(c) for fp, c in expected.targets.items()}
    distinct = {fp: len(who) for fp, who in expected.reporters.items()}
    assert reporters == distinct and reporter_rows == distinct


def test_ten_thousand_events_exact(store: Store) -> None:
    stream = synthetic_stream(10_000, duplicate_share=0.3, recurring_share=0.2, seed=7)
    assert len(stream.deliveries) == 10_000
    new = duplicates = created = 0
    for batch in stream.batches(400):
        result = store.record_batch(batch)
        new, duplicates, created = (
            new + result.new_reports,
            duplicates + result.duplicates,
            created + result.mistakes_created,
        )
    assert (new, duplicates, created) == (7_000, 3_000, 5_600)
    _check(store, stream.expected)

    # a consumer restart replays everything: nothing changes
    for batch in stream.batches(1_000):
        assert store.record_batch(batch).new_reports == 0
    _check(store, stream.expected)
