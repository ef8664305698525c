"""SIGKILL in the middle of record_batch leaves the whole batch or none of it (both backends)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from memory.schema import Mistake, MistakeReporter, MistakeTarget
from memory.store import Store
from tests.test_memory_store import report

REPO = Path(__file__).resolve().parent.parent
BATCH = 200

# The child records batches of BATCH new events (a quarter of them recurring). With a stage it
# stops inside the first batch's transaction, right after that statement ran, and says so; without
# one it keeps recording until it is killed at a random moment.
CHILD = r"""
import os, sys, time
from sqlalchemy import event
from memory.store import Store
from tests.test_memory_store import report

url, stage, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = Store.open(url)

@event.listens_for(store.engine, "after_cursor_execute")
def pause(conn, cursor, statement, parameters, context, executemany):
    if stage != "random" and statement.lstrip().startswith(stage):
        print("inside", flush=True)
        time.sleep(600)

n = 0
while True:
    pid = os.getpid()  # each child writes events and inputs of its own
    batch = [report(f"child-{pid}-{n}-{i}", f"input {pid}-{n}-{i // 4}", reporter=f"u{i % 7}")
             for i in range(batch_size)]
    store.record_batch(batch)
    n += 1
    print("committed", n, flush=True)
"""


def _child(url: str, stage: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", CHILD, url, stage, str(BATCH)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip


def _consistent(store: Store) -> int:
    """Whole batches only, and every counter agrees with the reports table; returns report count."""
    counts = store.table_counts()
    assert counts["reports"] % BATCH == 0, f"{counts['reports']} reports: a partial batch was committed"
    with store._reading() as session:
        assert (session.scalar(select(func.sum(Mistake.report_count))) or 0) == counts["reports"]
        assert (session.scalar(select(func.sum(MistakeTarget.count))) or 0) == counts["reports"]
        assert (session.scalar(select(func.sum(Mistake.reporter_count))) or 0) == counts["mistake_reporters"]
        assert session.scalar(select(func.count()).select_from(MistakeReporter)) == counts["mistake_reporters"]
        assert counts["mistakes"] == counts["reports"] // 4
    return counts["reports"]


@pytest.mark.parametrize(
    "stage", ["INSERT INTO mistakes", "INSERT INTO reports", "INSERT INTO mistake_targets", "UPDATE mistakes"]
)
def test_kill_inside_the_transaction_keeps_nothing(migrated_url: str, stage: str) -> None:
    with Store.open(migrated_url) as store:
        store.record_batch([report(f"before-{i}", f"earlier {i // 4}") for i in range(BATCH)])
    child = _child(migrated_url, stage)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "inside", "the child never reached the stage"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    with Store.open(migrated_url) as store:
        assert _consistent(store) == BATCH  # only the batch committed before the child started


def test_kill_at_random_moments_keeps_whole_batches(migrated_url: str) -> None:
    rng = random.Random(11)
    total = 0
    for _ in range(3):
        child = _child(migrated_url, "random")
        try:
            assert child.stdout is not None
            child.stdout.readline()  # at least one batch committed, so the kill lands mid-stream
            time.sleep(rng.uniform(0.0, 0.5))
            child.send_signal(signal.SIGKILL)
        finally:
            child.wait(timeout=60)
        with Store.open(migrated_url) as store:
            now = _consistent(store)
        assert now > total
        total = now
