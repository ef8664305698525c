"""memory/lock.py: one daemon per model, a standby waits (real PostgreSQL, real file locks)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from memory.lock import ModelLock, lock_key


def _url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/state/patchd.db"
    return str(request.getfixturevalue("pg_database"))


def test_lock_key_is_a_stable_signed_bigint() -> None:
    key = lock_key("fever-minilm")
    assert key == lock_key("fever-minilm") != lock_key("zsre-smollm2")
    assert -(2**63) <= key < 2**63


def test_one_holder_per_model_and_the_standby_takes_over(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = _url(backend, tmp_path, request)
    active, standby, other = ModelLock(url, "m"), ModelLock(url, "m"), ModelLock(url, "other model/x")
    try:
        assert active.try_acquire() and active.held()
        assert active.try_acquire()  # re-entrant for its holder
        assert not standby.try_acquire() and not standby.held()
        assert other.try_acquire()  # another model never contends

        stop = threading.Event()
        waits: list[float] = []
        got: list[bool] = []
        waiter = threading.Thread(target=lambda: got.append(standby.acquire(stop, poll_s=0.05, on_wait=waits.append)))
        waiter.start()
        time.sleep(0.3)
        assert not got and len(waits) >= 2  # the standby waits and says so
        active.release()
        waiter.join(timeout=10)
        assert got == [True] and standby.held()
        assert not active.try_acquire()  # roles swapped
    finally:
        for lock in (active, standby, other):
            lock.release()


def test_a_stopped_standby_gives_up(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/patchd.db"
    with ModelLock(url, "m") as active:
        assert active.try_acquire()
        stop = threading.Event()
        stop.set()
        assert not ModelLock(url, "m").acquire(stop, poll_s=0.05)


def test_sqlite_lock_file_sits_beside_the_database(tmp_path: Path) -> None:
    with ModelLock(f"sqlite:///{tmp_path}/db/patchd.db", "fever minilm") as lock:
        assert lock.try_acquire()
        assert lock.path.parent == tmp_path / "db" and lock.path.name.startswith("patchd.db.fever_minilm-")
        assert lock.path.read_text().strip().isdigit()  # the holder's pid, for an operator


@pytest.mark.postgres
def test_postgres_session_loss_frees_the_lock(pg_database: str) -> None:
    """A holder whose database session dies has lost the lock (held() says so); the standby gets it."""
    active, standby = ModelLock(pg_database, "m"), ModelLock(pg_database, "m")
    try:
        assert active.try_acquire()
        admin = create_engine(pg_database, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            pids = conn.scalars(
                text("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid = :lo"),
                {"lo": lock_key("m") & 0xFFFFFFFF},
            ).all()
            assert len(pids) == 1
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pids[0]})
        admin.dispose()
        assert not active.held()
        assert standby.try_acquire()
    finally:
        active.release()
        standby.release()
