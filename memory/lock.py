"""One patching daemon per model: an exclusive lock that a standby daemon waits on.

Two daemons patching the same model would each train on a model that misses the other's neurons.
So a daemon takes this lock before it loads anything and holds it until it exits; a second daemon
for the same model (a standby on another host) waits, and takes over when the first one dies.

    PostgreSQL  a session-level advisory lock, pg_try_advisory_lock(key), on a dedicated
                connection; key = the first 8 bytes of sha256("patchd:<model>") as a signed
                bigint. The server releases it when that connection ends: at once for a daemon
                that exits or crashes, and for a host that vanished once the server's TCP
                keepalives notice (tune tcp_keepalives_* in postgresql.conf; deploy/README.md).
    SQLite      fcntl.flock on "<database file>.<model>.lock" beside the database: SQLite is a
                single-host setup, and the kernel releases the lock when the process exits.

Different models never contend (different keys / files). A lock whose connection dropped is
reported by held() = False: the daemon must then stop, since the standby may already patch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from memory.engine import normalise_url


def lock_key(model: str) -> int:
    """The advisory lock key of `model`: a stable signed 64-bit integer (PostgreSQL's bigint)."""
    return int.from_bytes(hashlib.sha256(f"patchd:{model}".encode()).digest()[:8], "big", signed=True)


class ModelLock:
    """`try_acquire()` without waiting, `acquire(stop, on_wait)` waiting, `held()`, `release()`."""

    def __init__(self, url: str | URL, model: str):
        self.url = normalise_url(url)
        self.model = model
        self.backend = self.url.get_backend_name()
        self._conn: Connection | None = None
        self._fd: int | None = None

    @property
    def where(self) -> str:
        """What is locked, for logs (no password)."""
        if self.backend == "postgresql":
            return f"advisory lock {lock_key(self.model)} on {self.url.render_as_string(hide_password=True)}"
        return f"file lock {self.path}"

    @property
    def path(self) -> Path:
        """SQLite: the lock file beside the database (model name made file-safe, plus a short hash)."""
        assert self.url.database
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", self.model)[:64]
        suffix = hashlib.sha256(self.model.encode()).hexdigest()[:8]
        return Path(self.url.database).expanduser().with_name(f"{Path(self.url.database).name}.{safe}-{suffix}.lock")

    def try_acquire(self) -> bool:
        """Take the lock if it is free; True when this object holds it (now or already)."""
        if self._conn is not None or self._fd is not None:
            return True
        if self.backend == "postgresql":
            return self._try_pg()
        return self._try_file()

    def acquire(
        self, stop: threading.Event, poll_s: float = 5.0, on_wait: Callable[[float], None] | None = None
    ) -> bool:
        """Wait for the lock, trying every `poll_s`; False when `stop` was set first.

        `on_wait(waited_s)` (optional) is called before every wait: the standby's log line and
        watchdog ping.
        """
        waited = 0.0
        while not stop.is_set():
            if self.try_acquire():
                return True
            if on_wait is not None:
                on_wait(waited)
            stop.wait(poll_s)
            waited += poll_s
        return False

    def held(self) -> bool:
        """Still held: the PostgreSQL connection answers (a dropped session has lost the lock)."""
        if self._fd is not None:
            return True
        if self._conn is None:
            return False
        try:
            self._conn.execute(text("SELECT 1"))
        except Exception:  # noqa: BLE001 - any failure means the session, and so the lock, is gone
            return False
        return True

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": lock_key(self.model)})
            except Exception:  # noqa: BLE001 - closing the session releases it anyway
                pass
            self._close_pg()
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ModelLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------ backends

    def _try_pg(self) -> bool:
        # NullPool + AUTOCOMMIT: a connection of its own, never handed back to a pool with the lock
        # still on it, and never left idle in a transaction for the daemon's lifetime
        engine = create_engine(self.url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        conn = engine.connect()
        try:
            got = bool(conn.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": lock_key(self.model)}))
        except BaseException:
            conn.close()
            engine.dispose()
            raise
        if not got:
            conn.close()
            engine.dispose()
            return False
        self._conn = conn
        return True

    def _close_pg(self) -> None:
        assert self._conn is not None
        engine = self._conn.engine
        try:
            self._conn.close()
        except Exception:  # noqa: BLE001 - a killed session cannot even roll back: drop it unreturned
            with contextlib.suppress(Exception):
                self._conn.invalidate()
        finally:
            engine.dispose()
            self._conn = None

    def _try_file(self) -> bool:
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for an operator's `cat`
        self._fd = fd
        return True
