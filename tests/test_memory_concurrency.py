"""A writer thread and a reader/worker thread for 30 s: no lost write, no "database is locked"."""

from __future__ import annotations

import itertools
import os
import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, func, select, text

from memory.lifecycle import Status
from memory.records import ReportIn
from memory.schema import Mistake, MistakeTarget
from memory.store import Store
from tests.test_memory_store import add_patch, report

# the issue asks for 30 s per backend; PATCHD_TEST_CONCURRENCY_S shortens it for quick local runs
DURATION_S = float(os.environ.get("PATCHD_TEST_CONCURRENCY_S", "30"))


def endless_batches(size: int = 50, seed: int = 3) -> Iterator[list[ReportIn]]:
    """Small batches (many short transactions, many chances to collide): 30% redeliveries, 20% recurring."""
    rng = random.Random(seed)
    sent: list[ReportIn] = []
    for n in itertools.count():
        batch = []
        for i in range(size):
            if sent and rng.random() < 0.3:
                batch.append(rng.choice(sent[-500:]))
                continue
            text = f"input {rng.randrange(n * size + i + 1)}" if rng.random() < 0.2 else f"input {n * size + i}"
            batch.append(report(f"conc-{n}-{i}", text, model="bench", reporter=f"u{rng.randrange(50)}"))
            sent.append(batch[-1])
        yield batch


def test_writer_and_reader_threads(store: Store) -> None:
    errors: list[BaseException] = []
    written = {"new": 0, "batches": 0}
    seen = {"reads": 0, "claimed": 0, "max_reports": 0}
    stop = threading.Event()
    since = datetime.now(UTC) - timedelta(minutes=1)

    def writer() -> None:
        try:
            for batch in endless_batches():
                if stop.is_set():
                    return
                written["new"] += store.record_batch(batch).new_reports
                written["batches"] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            stop.set()

    def reader() -> None:
        """The worker's side: claim, patch, read counters; reads must never go backwards."""
        try:
            while not stop.is_set():
                mistake = store.next_mistake("bench")
                if mistake is not None:
                    seen["claimed"] += 1
                    keep = seen["claimed"] % 2 == 0
                    add_patch(store, mistake.id, accepted=keep)
                    if seen["claimed"] % 2:
                        store.set_status(mistake.id, Status.GATE_REJECTED)
                reports = sum(store.reporter_counts("bench", since).values())
                assert reports >= seen["max_reports"], "a committed report disappeared"
                seen["max_reports"] = reports
                store.status_counts("bench")
                seen["reads"] += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=writer, name="writer"), threading.Thread(target=reader, name="reader")]
    for thread in threads:
        thread.start()
    stop.wait(DURATION_S)
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread did not stop"
    assert errors == [], f"{len(errors)} error(s), first: {errors[0]!r}"

    # no lost write: every new report the writer was told about is there, and counters agree
    counts = store.table_counts()
    assert counts["reports"] == written["new"] > 0
    assert seen["claimed"] > 0 and seen["reads"] > 0
    assert counts["patches"] == seen["claimed"]
    with store._reading() as session:
        assert session.scalar(select(func.sum(Mistake.report_count))) == counts["reports"]
        assert session.scalar(select(func.sum(MistakeTarget.count))) == counts["reports"]


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_worker_locks_do_not_wait_for_a_batch_inserting_reports(store: Store, migrated_url: str) -> None:
    """A batch's report inserts hold FOR KEY SHARE on their mistakes until it commits (the foreign
    key). The worker's locks must not wait for it: FOR UPDATE did, and taken in another order than
    the batch's own locks that was a deadlock (seen in CI). FOR NO KEY UPDATE waits for nothing."""
    store.record_batch([report("k1", "first input", model="bench"), report("k2", "second input", model="bench")])
    ids = [m.id for m in store.mistakes("bench")]
    done: list[object] = []

    def worker() -> None:
        claimed = store.next_mistake("bench")
        assert claimed is not None
        store.set_status(claimed.id, Status.GATE_REJECTED)
        done.append(store.requeue("bench", [Status.GATE_REJECTED], "again"))

    other = create_engine(migrated_url)
    try:
        with other.connect() as conn, conn.begin():
            # what an open ingest transaction holds on both mistakes: a report row referencing each
            conn.execute(text("SELECT id FROM mistakes WHERE id = ANY(:ids) FOR KEY SHARE"), {"ids": ids})
            thread = threading.Thread(target=worker, name="worker")
            thread.start()
            thread.join(timeout=20)
            blocked = thread.is_alive()
        thread.join(timeout=60)  # the lock is gone: a blocked worker goes on and ends
    finally:
        other.dispose()
    assert not blocked, "the worker waited for the batch's FOR KEY SHARE locks"
    assert len(done) == 1 and len(done[0]) == 1  # type: ignore[arg-type]
