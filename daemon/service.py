"""`patchd run`: wire the store, the patched model, the consumer, the worker and the jobs together.

Threads:
    main            the consumer loop (owns the KafkaConsumer) and the signal handlers
    patchd-worker   the serial patch loop (daemon/worker.py)
    APScheduler     publish / retention / health jobs (daemon/scheduler.py)

Start-up: open the store (migrating it), load the base and build M and the held-out cache, then
rebuild the exact patched model: mistakes left in `patching` are re-queued and the stored patches
are replayed in order (daemon/model.py). Consumption continues from the committed offsets. The
worker starts once the consumer has caught up with what is already in Kafka, so the policy sees
every report of that backlog before it picks (or as soon as backpressure pauses the consumer).

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
from daemon.logs import bind, clear_context, get_logger
from daemon.model import PatchedModel, Rebuilt
from daemon.scheduler import Jobs
from daemon.settings import Settings, effective_settings, mask_url
from daemon.worker import Worker
from memory.store import Store

log = get_logger(__name__)

# how often the main thread checks on the worker while --once waits for it to drain the queue
JOIN_TICK_S = 0.5


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

    # ------------------------------------------------------------------ signals

    def request_stop(self, reason: str = "requested") -> None:
        """Warm stop: finish the current batch and neuron, commit, exit 0."""
        if not self.stopping.is_set():
            log.info("warm stop: finishing the current batch and neuron", reason=reason)
        self.stopping.set()
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
        self.store = Store.open(s.database.url)
        try:
            return self._run(t0)
        finally:
            self.store.close()
            clear_context()

    def _run(self, t0: float) -> int:
        assert self.store is not None
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
        self.jobs = Jobs(self.settings, self.snapshot)
        if not self.consumer.connect():
            return 0  # stopped while waiting for the broker
        self.worker.start()
        self.jobs.start()
        try:
            self._consume()
        finally:
            self.ingest_done.set()
            self.consumer.work_allowed.set()  # nothing more will arrive: the worker may drain
            self.consumer.close()
            self.timings["ingest_s"] = time.perf_counter() - t0
        self._finish_worker()
        self.jobs.shutdown()
        self.timings["total_s"] = time.perf_counter() - t0
        error = self.worker.error
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
        while not self.stopping.is_set():
            if self.worker.error is not None:
                log.error("the worker failed; stopping", error=repr(self.worker.error))
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
            "replay_mismatches": len(self.rebuilt.mismatches) if self.rebuilt else 0,
        }
