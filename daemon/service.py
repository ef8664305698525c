"""`patchd run`: wire the store, the patched model, the consumer, the worker and the jobs together.

Threads:
    main            the consumer loop (owns the KafkaConsumer) and the signal handlers
    patchd-worker   the serial patch loop (daemon/worker.py)
    APScheduler     publish / retention / health jobs (daemon/scheduler.py, daemon/publisher.py)

Start-up: open the store (migrating it), load the base and build M and the held-out cache, then
rebuild the exact patched model: mistakes left in `patching` are re-queued and the stored patches
are replayed in order (daemon/model.py). Consumption continues from the committed offsets. The
worker starts once the consumer has caught up with what is already in Kafka, so the policy sees
every report of that backlog before it picks (or as soon as backpressure pauses the consumer).

One daemon per model: before loading anything it takes the model's lock (memory/lock.py); a
second daemon for the same model waits as a standby and takes over when the first one exits.
Under systemd (Type=notify, daemon/notify.py) it sends READY=1 once the model, the memory set and
the consumer are up (a standby sends it while it waits), WATCHDOG=1 from the main loop,
EXTEND_TIMEOUT_USEC while loading, and STOPPING=1 when a stop begins. /livez /readyz /metrics
are served on [health] host:port (daemon/health.py; port 0 turns the endpoint off).

Stopping (rq's warm/cold): the first SIGTERM/SIGINT ends the consumer loop after its current
batch is stored and committed and lets the worker finish the current neuron, then exits 0. A
second signal exits at once; nothing is lost even then, because offsets are committed only after
the store has the batch and a neuron is in the model only after its row is stored.

`--once` is the same code path: the loop ends when every partition is stored and committed to its
end, then the worker drains the queue and the process exits (tests, cron, benchmarks).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from typing import Any

from daemon.consumer import Consumer
from daemon.health import HealthServer
from daemon.logs import bind, clear_context, get_logger
from daemon.model import PatchedModel, Rebuilt
from daemon.notify import Notifier
from daemon.publisher import daemon_publisher, signer_of, storage_of, unsigned_after_signed
from daemon.scheduler import Jobs
from daemon.settings import Settings, SettingsError, effective_settings, mask_url
from daemon.worker import Worker
from memory.lock import ModelLock
from memory.store import Store

log = get_logger(__name__)

# how often the main thread checks on the worker while --once waits for it to drain the queue
JOIN_TICK_S = 0.5
# a standby tries the model lock this often (a takeover waits at most this long after the holder exits)
LOCK_POLL_S = 5.0
# ... and says it is waiting this often in the log
STANDBY_LOG_S = 300.0
# the holder checks its lock this often: a PostgreSQL session can drop, and the standby then takes over
LOCK_CHECK_S = 30.0


class Service:
    def __init__(self, settings: Settings, *, once: bool = False, handle_signals: bool = True):
        self.settings = settings
        self.once = once
        self.handle_signals = handle_signals
        self.stopping = threading.Event()  # warm stop requested
        self.ingest_done = threading.Event()  # the consumer loop has ended: no new reports
        self.started_at = time.time()
        self.store: Store | None = None
        self.model: PatchedModel | None = None
        self.rebuilt: Rebuilt | None = None
        self.consumer: Consumer | None = None
        self.worker: Worker | None = None
        self.jobs: Jobs | None = None
        self.timings: dict[str, float] = {}
        self.notifier = Notifier()
        self.lock: ModelLock | None = None
        self.health: HealthServer | None = None
        # starting -> (standby ->) loading -> running -> stopping -> stopped; /livez and /readyz read it
        self.phase = "starting"
        self.heartbeat = time.monotonic()  # the main loop's last round (/livez)
        self.failure: str | None = None  # a reason to exit non-zero that is not the worker's error

    # ------------------------------------------------------------------ signals

    def request_stop(self, reason: str = "requested") -> None:
        """Warm stop: finish the current batch and neuron, commit, exit 0."""
        if not self.stopping.is_set():
            log.info("warm stop: finishing the current batch and neuron", reason=reason)
        self.stopping.set()
        self.notifier.stopping("stopping: finishing the current batch and neuron")
        if self.worker is not None:
            self.worker.request_stop()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.stopping.is_set():
            # cold stop: the store and the committed offsets are consistent at every instant,
            # so exiting here only drops work that the next start redoes (recover + redelivery)
            log.warning("cold stop: exiting now", signal=name)
            sys.stdout.flush()
            os._exit(128 + signum)
        self.request_stop(reason=name)

    def _install_signals(self) -> None:
        if self.handle_signals:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)

    # ------------------------------------------------------------------ run

    def run(self) -> int:
        """Run until stopped (or, with once, until topic and queue are drained); the exit code."""
        bind(thread="main")
        self._install_signals()
        s = self.settings
        log.info(
            "patchd starting",
            model=s.model.name,
            base=s.model.base,
            topic=s.kafka.topic,
            database=mask_url(s.database.url),
            once=self.once,
            settings=effective_settings(s),
        )
        t0 = time.perf_counter()
        self._check_storage()
        if s.health.port:  # first, so that /livez answers during a long start-up
            try:
                self.health = HealthServer(self, s.health.host, s.health.port).start()
            except OSError as exc:
                raise SettingsError(
                    f"health.port = {s.health.port}: cannot listen on {s.health.host}: {exc.strerror or exc} "
                    "(choose another port, or 0 to turn the endpoint off)"
                ) from None
        try:
            if not self._take_lock():  # before the store: only the lock holder migrates the schema
                return 0  # stopped while standing by
            t0 = time.perf_counter()  # a standby's start-up begins when it takes over
            with self.notifier.extending():
                self.store = Store.open(s.database.url)
            try:
                return self._run(t0)
            finally:
                self.store.close()
        finally:
            self.phase = "stopped"
            self.notifier.stopping()
            if self.lock is not None:
                self.lock.release()
            if self.health is not None:
                self.health.stop()
            clear_context()

    def _check_storage(self) -> None:
        """Stop start-up at once on storage that cannot work (a missing bucket, bad credentials, an
        unwritable directory) or a signing key that cannot be read, naming the setting, rather
        than after a long load at the first publish."""
        from patching.signing import SigningError
        from patching.storage import StorageSetupError

        try:
            storage = storage_of(self.settings)
            storage.check()
        except StorageSetupError as exc:
            value = self.settings.storage.root if exc.setting == "root" else None
            shown = f" = {value!r}" if value is not None else ""
            raise SettingsError(f"storage.{exc.setting}{shown}: {exc}") from None
        try:
            signer = signer_of(self.settings)
        except SigningError as exc:
            raise SettingsError(f"publish.signing_key = '{self.settings.publish.signing_key}': {exc}") from None
        refusal = unsigned_after_signed(storage, self.settings.model.name, signer)
        if refusal:
            raise SettingsError(f"publish.signing_key: {refusal}")
        log.info("versions are signed" if signer else "versions are NOT signed", key_id=signer and signer.key_id)

    def _run(self, t0: float) -> int:
        assert self.store is not None
        self.phase = "loading"
        self.notifier.status("loading the model and its memory set")
        with self.notifier.extending():
            self.model = PatchedModel.load(self.settings)
            self.rebuilt = self.model.rebuild(self.store)
        self.timings["startup_s"] = time.perf_counter() - t0
        if self.stopping.is_set():
            return 0
        self.consumer = Consumer(self.settings, self.store, self.model.labels, stop=self.stopping)
        self.worker = Worker(
            self.store,
            self.model,
            self.settings.policy,
            work_allowed=self.consumer.work_allowed,
            ingest_done=self.ingest_done,
            once=self.once,
        )
        self.consumer.on_stored = self.worker.wake
        self.jobs = Jobs(self.settings, self.snapshot, daemon_publisher(self.settings, self.store, self.model))
        self.worker.on_patched = self.jobs.publish_soon
        with self.notifier.extending():
            if not self.consumer.connect():
                return 0  # stopped while waiting for the broker
        self.phase = "running"
        self.heartbeat = time.monotonic()
        self.notifier.ready(f"patching {self.settings.model.name} from {self.settings.kafka.topic}")
        self.worker.start()
        self.jobs.start()
        try:
            self._consume()
        except Exception as exc:
            # an unhandled error in the loop stops the daemon like a warm stop and exits 1: the
            # worker finishes (or gives back) its mistake and is joined before the process ends,
            # rather than the interpreter tearing down under a running thread (SIGABRT)
            log.exception("unhandled error in the consumer loop; stopping")
            self.failure = f"{type(exc).__name__}: {exc}"
            self.stopping.set()
        finally:
            self.phase = "stopping"
            self.notifier.stopping()
            self.ingest_done.set()
            self.consumer.work_allowed.set()  # nothing more will arrive: the worker may drain
            self.consumer.close()
            self.timings["ingest_s"] = time.perf_counter() - t0
        self._finish_worker()
        if self.worker.error is None:  # after an error the model may not match the store: no snapshot
            self.model.save_snapshot()  # the next start restores it instead of replaying (~1 s at 10,000 patches)
        else:
            self._give_back()
        self.jobs.shutdown()
        self.timings["total_s"] = time.perf_counter() - t0
        error = self.worker.error or self.failure
        log.info(
            "patchd stopped",
            exit=1 if error else 0,
            seconds=round(self.timings["total_s"], 2),
            ingest=asdict(self.consumer.stats),
            outcomes=dict(self.worker.stats.outcomes),
        )
        return 1 if error else 0

    def _consume(self) -> None:
        assert self.consumer is not None and self.worker is not None
        lock_checked = time.monotonic()
        while not self.stopping.is_set():
            self.heartbeat = time.monotonic()
            self.notifier.watchdog()
            if self.worker.error is not None:
                log.error("the worker failed; stopping", error=repr(self.worker.error))
                self.stopping.set()
                return
            if self.lock is not None and self.heartbeat - lock_checked > LOCK_CHECK_S:
                lock_checked = self.heartbeat
                if not self.lock.held():
                    # a standby may be patching already: stop at once, exit non-zero (systemd restarts us
                    # and we stand by); the worker's current neuron is still stored before exiting
                    log.error("lost the model lock (database session ended); stopping", lock=self.lock.where)
                    self.failure = "lost the model lock"
                    self.stopping.set()
                    return
            handled = self.consumer.step()
            if self.once and handled == 0 and self.consumer.drained():
                log.info(
                    "topic drained",
                    **{k: v for k, v in asdict(self.consumer.stats).items() if k != "last_poll_at"},
                )
                return

    def _finish_worker(self) -> None:
        """--once: let the worker drain the queue (a signal still stops it warm); else stop it now."""
        assert self.worker is not None
        if not (self.once and not self.stopping.is_set()):
            self.worker.request_stop()
        while self.worker.is_alive():
            self.worker.join(JOIN_TICK_S)

    def _give_back(self) -> None:
        """The worker died holding a claimed mistake: put it back in the queue now (the next start
        would too), so that `patchd status` shows no mistake in `patching` after the exit."""
        assert self.store is not None
        try:
            requeued = self.store.recover_interrupted(self.settings.model.name)
        except Exception as exc:  # noqa: BLE001 - the database may be why the worker failed
            log.warning("could not re-queue the interrupted mistake; the next start will", error=repr(exc))
            return
        if requeued:
            log.info("interrupted mistake back in the queue", mistakes=requeued)

    def _take_lock(self) -> bool:
        """Hold the model's lock; a second daemon for the model waits here (READY=1, /readyz 503)."""
        assert self.settings.database.url is not None  # resolved by load_settings
        self.lock = lock = ModelLock(self.settings.database.url, self.settings.model.name)
        if self.lock.try_acquire():
            log.info("model lock taken", lock=self.lock.where)
            return True
        self.phase = "standby"
        self.notifier.ready(f"standby: another daemon patches {self.settings.model.name}")
        last_log = [-STANDBY_LOG_S]

        def waiting(waited_s: float) -> None:
            self.heartbeat = time.monotonic()
            self.notifier.watchdog()
            if waited_s - last_log[0] >= STANDBY_LOG_S:
                last_log[0] = waited_s
                log.info("standby: another daemon holds the model lock", lock=lock.where, waited_s=waited_s)

        if not self.lock.acquire(self.stopping, poll_s=LOCK_POLL_S, on_wait=waiting):
            return False
        log.info("model lock taken over from the previous daemon", lock=self.lock.where)
        return True

    # ------------------------------------------------------------------ health

    def snapshot(self) -> dict[str, Any]:
        """What the health job writes to health.json (and `patchd check` reads)."""
        c, w = self.consumer, self.worker
        return {
            "model": self.settings.model.name,
            "started_at": self.started_at,
            "consumer": asdict(c.stats) if c else None,
            "paused": c.paused if c else None,
            "caught_up": c.caught_up.is_set() if c else False,
            "worker_alive": bool(w and w.is_alive()),
            "worker_busy_since": w.stats.busy_since if w else None,
            "outcomes": dict(w.stats.outcomes) if w else {},
            "replayed": self.rebuilt.replayed if self.rebuilt else 0,
            "restored": self.rebuilt.restored if self.rebuilt else 0,
            "replay_mismatches": len(self.rebuilt.mismatches) if self.rebuilt else 0,
        }
