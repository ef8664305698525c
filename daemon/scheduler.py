"""Periodic jobs on an APScheduler 3.x BackgroundScheduler (the consumer loop owns the main thread).

    publish    every publish.interval_s, at start-up, and right after an accepted patch (publish_soon)
               but never sooner than publish.interval_s after the previous one began: a new version
               when the accepted patch set changed (daemon/publisher.py)
    retention  hourly: delete old versions on storage, keeping the newest and LATEST's
    health     every HEALTH_INTERVAL_S: write <state.dir>/health.json, which `patchd check` reads

Every job runs with max_instances=1 (never two at once), coalesce=True (a backlog of missed runs
is one run) and misfire_grace_time=None (a run delayed by a long patch still runs, however late:
APScheduler's default of 1 s would silently skip it). Jobs get explicit ids and
replace_existing=True so a persistent job store could never duplicate them across restarts.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.background import BackgroundScheduler

from daemon.logs import bind, get_logger
from daemon.settings import Settings

if TYPE_CHECKING:
    from daemon.publisher import Publisher

log = get_logger(__name__)

# health snapshots: often enough that `patchd check` sees a hung daemon within a minute
HEALTH_INTERVAL_S = 15.0
# a snapshot older than this many intervals means the daemon is gone or its scheduler is stuck
HEALTH_STALE_INTERVALS = 4
# versions on storage change at most every publish interval; hourly pruning is plenty
RETENTION_INTERVAL_S = 3600.0
HEALTH_FILE = "health.json"

JOB_DEFAULTS = {"max_instances": 1, "coalesce": True, "misfire_grace_time": None}


def health_path(settings: Settings) -> Path:
    assert settings.state.dir is not None  # resolved by load_settings
    return Path(settings.state.dir) / HEALTH_FILE


def write_health(path: Path, snapshot: dict[str, Any]) -> None:
    """Write-temp + rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**snapshot, "pid": os.getpid(), "written_at": time.time()}, default=str))
    os.replace(tmp, path)


def read_health(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Jobs:
    """The daemon's periodic jobs. `snapshot` is the service's view of itself (for health.json)."""

    def __init__(self, settings: Settings, snapshot: Callable[[], dict[str, Any]], publisher: Publisher | None = None):
        self.settings = settings
        self.snapshot = snapshot
        self.publisher = publisher  # None: the publish and retention jobs have nothing to do
        self.runs: dict[str, int] = {"publish": 0, "retention": 0, "health": 0}
        self.scheduler = BackgroundScheduler(job_defaults=JOB_DEFAULTS, timezone="UTC")
        self.scheduler.add_job(
            self.publish,
            "interval",
            seconds=settings.publish.interval_s,
            id="publish",
            name="publish",
            replace_existing=True,
            # at once: recover an interrupted publish and publish patches a crash left unpublished
            next_run_time=datetime.now(UTC) if publisher else None,
        )
        self.scheduler.add_job(
            self.retention,
            "interval",
            seconds=RETENTION_INTERVAL_S,
            id="retention",
            name="retention",
            replace_existing=True,
        )
        self.scheduler.add_job(
            self.health,
            "interval",
            seconds=HEALTH_INTERVAL_S,
            id="health",
            name="health",
            replace_existing=True,
        )

    def start(self) -> None:
        self.scheduler.start()
        self._write_health(state="running")  # a fresh snapshot at once, not one interval later

    def shutdown(self) -> None:
        """Wait for a running job to finish (jobs are short), then stop; a final snapshot says so."""
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        if self.publisher is not None:
            self._publish_once()  # the last accepted patches go out before the process ends
            self.publisher.close()
        self._write_health(state="stopped")

    # ------------------------------------------------------------------ jobs

    def publish_soon(self) -> None:
        """An accepted patch: publish now, or once publish.interval_s has passed since the last publish
        began (counting from its start, a request never lands on a publish still running)."""
        if self.publisher is None or not self.scheduler.running:
            return
        when = max(time.time(), self.publisher.last_started + self.settings.publish.interval_s)
        try:
            self.scheduler.modify_job("publish", next_run_time=datetime.fromtimestamp(when, UTC))
        except Exception as exc:  # noqa: BLE001 - shutting down; the final publish covers it
            log.debug("publish not rescheduled", error=repr(exc))

    def publish(self) -> None:
        bind(job="publish")
        self.runs["publish"] += 1
        self._publish_once()

    def _publish_once(self) -> None:
        if self.publisher is None:
            return
        try:
            self.publisher.publish_if_changed()
        except Exception as exc:  # noqa: BLE001 - storage away (an NFS outage): patching goes on, the next run retries
            log.error("publish failed; the next run retries", error=repr(exc))

    def retention(self) -> None:
        bind(job="retention")
        self.runs["retention"] += 1
        if self.publisher is None:
            return
        try:
            self.publisher.prune()
        except Exception as exc:  # noqa: BLE001 - the next run retries
            log.error("retention failed; the next run retries", error=repr(exc))

    def health(self) -> None:
        bind(job="health")
        self.runs["health"] += 1
        self._write_health(state="running")

    def _write_health(self, state: str) -> None:
        try:
            write_health(health_path(self.settings), {"state": state, **self.snapshot()})
        except Exception as exc:  # noqa: BLE001 - a full disk must not kill the scheduler thread
            log.warning("health snapshot not written", error=repr(exc))
