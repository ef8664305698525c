"""The daemon's HTTP endpoint for probes and Prometheus (standard library server, its own thread).

    GET /livez    200 while the main loop's heartbeat is fresh (start-up and a warm stop count as
                  alive: systemd's start/stop timeouts govern those); 503 when it is stale
    GET /readyz   200 when the model is loaded, the consumer has partitions assigned, none is
                  stuck on an undecodable batch, the broker answered the consumer's last lookup and
                  the database answers; 503 otherwise (start-up, standby, stopping, broker or db
                  down, a stuck partition: the body names it)
    GET /metrics  Prometheus text format, from a CollectorRegistry of this server's own (not the
                  process-wide default), so several daemons or tests can live in one process

Probe bodies are small JSON objects naming each check. The metrics are read at scrape time from
what the daemon already counts (daemon/consumer.py IngestStats, daemon/worker.py WorkerStats) and
from the database (mistakes by status, backlog, the last published version): nothing in the hot
paths changes for them. Per-process numbers are counters (they restart at 0 with the process, as
Prometheus expects); database numbers are gauges.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.consumer import Consumer
from daemon.logs import get_logger
from daemon.model import PatchedModel
from daemon.settings import Settings
from daemon.worker import Worker
from memory.store import Store

log = get_logger(__name__)

# a heartbeat older than this means the main loop is stuck: one loop round is at most ~75 s (a
# SQLite lock wait, a DLQ ack and a commit timing out back to back), and the unit's WatchdogSec
# (180 s) restarts the daemon a little later than this probe reports it
LIVE_STALE_S = 120.0
# database probe results are reused this long: a scraper and two probes must not hammer it
DB_CHECK_TTL_S = 5.0
# edit durations (claim to stored verdict of a trained neuron): tens of ms on a GPU, seconds to
# minutes on a CPU or with the reference trainer
EDIT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# the outcomes that trained a neuron (already_fixed is one forward pass, failed is an error)
TRAINED = ("patched", "gate_rejected")
# phases in which /livez does not look at the heartbeat (systemd's start/stop timeouts apply)
UNWATCHED_PHASES = ("starting", "loading", "stopping")


class Monitored(Protocol):
    """What the endpoint reads of the running Service (daemon/service.py), each part None until up."""

    settings: Settings
    phase: str  # starting -> (standby ->) loading -> running -> stopping -> stopped
    heartbeat: float  # time.monotonic() of the main loop's last round
    store: Store | None
    model: PatchedModel | None
    consumer: Consumer | None
    worker: Worker | None


class ServiceCollector(Collector):
    """Reads the running Service (daemon/service.py) at every scrape."""

    def __init__(self, service: Monitored, health: HealthServer):
        self.service = service
        self.health = health
        self._lock = threading.Lock()
        self._seen = 0  # worker timings already folded into the histogram
        self._buckets = [0] * (len(EDIT_BUCKETS_S) + 1)
        self._sum = 0.0

    def collect(self) -> Iterator[Metric]:
        s = self.service
        model = s.settings.model.name
        live, _ = self.health.livez()
        ready, _ = self.health.readyz()
        yield _gauge("patchd_live", "1 while /livez answers 200", live)
        yield _gauge("patchd_ready", "1 while /readyz answers 200", ready)
        info = GaugeMetricFamily("patchd_model_info", "the patched model's name and base", labels=["model", "base"])
        info.add_metric([model, str(s.settings.model.base)], 1)
        yield info
        yield from self._ingest(s.consumer)
        yield from self._worker(s.worker)
        yield from self._database(s.store, model, s.settings.policy.quorum)
        yield from _gpu(s)

    def _ingest(self, consumer: Consumer | None) -> Iterator[Metric]:
        stats = consumer.stats if consumer is not None else None
        yield CounterMetricFamily(
            "patchd_events_consumed", "Kafka records consumed and stored", value=stats.records if stats else 0
        )
        reports = CounterMetricFamily("patchd_reports", "valid reports by result", labels=["result"])
        reports.add_metric(["new"], stats.new_reports if stats else 0)
        reports.add_metric(["duplicate"], stats.duplicates if stats else 0)
        yield reports
        rejected = CounterMetricFamily(
            "patchd_events_rejected", "invalid events dead-lettered, by reason", labels=["reason"]
        )
        for reason, count in sorted((stats.rejected_by_reason if stats else {}).items()):
            rejected.add_metric([reason], count)
        yield rejected
        skipped = CounterMetricFamily(
            "patchd_events_skipped",
            "events left to another daemon of a shared topic (kafka.known_models), by reason",
            labels=["reason"],
        )
        for reason, count in sorted((stats.skipped_by_reason if stats else {}).items()):
            skipped.add_metric([reason], count)
        yield skipped
        if stats is not None and stats.lag is not None:
            yield _gauge(
                "patchd_consumer_lag", "records in Kafka not yet consumed (all assigned partitions)", stats.lag
            )
        yield _gauge("patchd_consumer_assigned_partitions", "partitions assigned", stats.assigned if stats else 0)
        yield _gauge(
            "patchd_consumer_paused", "1 while backpressure pauses consumption", bool(consumer and consumer.paused)
        )
        stuck = consumer.quarantine.describe() if consumer is not None else []
        yield _gauge("patchd_consumer_stuck_partitions", "partitions stopped on an undecodable batch", len(stuck))
        offsets = GaugeMetricFamily(
            "patchd_consumer_stuck_offset",
            "the offset a stuck partition cannot decode (patchd kafka skip|retry)",
            labels=["topic", "partition"],
        )
        for item in stuck:
            if item["offset"] is not None:
                offsets.add_metric([item["topic"], str(item["partition"])], item["offset"])
        yield offsets

    def _worker(self, worker: Worker | None) -> Iterator[Metric]:
        outcomes = dict(worker.stats.outcomes) if worker is not None else {}
        done = CounterMetricFamily(
            "patchd_mistakes_done", "mistakes the worker finished, by outcome", labels=["outcome"]
        )
        for outcome in ("patched", "already_fixed", "gate_rejected", "failed"):
            done.add_metric([outcome], outcomes.get(outcome, 0))
        yield done
        patches = CounterMetricFamily("patchd_patches", "trained patches by the gate's verdict", labels=["result"])
        patches.add_metric(["accepted"], outcomes.get("patched", 0))
        patches.add_metric(["rejected"], outcomes.get("gate_rejected", 0))
        yield patches
        gate = CounterMetricFamily(
            "patchd_gate_failures", "failed gate checks of rejected patches, by check", labels=["reason"]
        )
        for reason, count in sorted((worker.stats.gate_failures if worker is not None else {}).items()):
            gate.add_metric([reason], count)
        yield gate
        yield self._edit_histogram(worker)
        busy = worker.stats.busy_since if worker is not None else None
        yield _gauge("patchd_worker_busy", "1 while a mistake is being patched", busy is not None)

    def _edit_histogram(self, worker: Worker | None) -> Metric:
        with self._lock:
            timings = worker.stats.timings if worker is not None else []
            new, self._seen = timings[self._seen :], max(self._seen, len(timings))
            for timing in new:
                if timing.outcome not in TRAINED:
                    continue
                seconds = timing.ms / 1000
                self._sum += seconds
                i = next((i for i, le in enumerate(EDIT_BUCKETS_S) if seconds <= le), len(EDIT_BUCKETS_S))
                self._buckets[i] += 1
            cumulative, total = [], 0
            for le, count in zip([*map(str, EDIT_BUCKETS_S), "+Inf"], self._buckets, strict=True):
                total += count
                cumulative.append((le, total))
            return HistogramMetricFamily(
                "patchd_edit_duration_seconds",
                "one edit: claim, forward, training, gate and retries, stored verdict (trained ones only)",
                buckets=cumulative,
                sum_value=self._sum,
            )

    def _database(self, store: Store | None, model: str, quorum: int) -> Iterator[Metric]:
        from memory.lifecycle import Status

        up = store is not None and self.health.database_ok(force=True)
        yield _gauge("patchd_database_up", "1 when the database answered this scrape", up)
        if store is None or not up:
            return
        try:
            counts = store.status_counts(model)
            pending = store.backlog(model, quorum)
            latest = store.latest_version(model)
        except Exception as exc:  # noqa: BLE001 - a scrape must answer even when the database fails
            log.warning("metrics: database read failed", error=repr(exc))
            return
        mistakes = GaugeMetricFamily("patchd_mistakes", "mistakes in the database by status", labels=["status"])
        for status in Status:
            mistakes.add_metric([str(status)], counts.get(status, 0))
        yield mistakes
        yield _gauge("patchd_backlog", "mistakes waiting for the worker", pending)
        if latest is not None:
            yield _gauge("patchd_last_published_version", "number of the newest published version", latest.number)
            yield _gauge(
                "patchd_last_published_timestamp_seconds",
                "when the newest version was published (Unix time)",
                latest.created_at.timestamp(),
            )


def _gauge(name: str, documentation: str, value: float | bool) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


def _gpu(service: Monitored) -> Iterator[Metric]:
    """GPU memory of the daemon's device, when it runs on one (torch is already loaded then)."""
    torch = sys.modules.get("torch")
    if torch is None or service.model is None or not torch.cuda.is_available():
        return
    device = service.model.patcher.memory.device
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    yield _gauge("patchd_gpu_memory_allocated_bytes", "bytes held by tensors", torch.cuda.memory_allocated(device))
    yield _gauge(
        "patchd_gpu_memory_reserved_bytes",
        "bytes held by torch's caching allocator",
        torch.cuda.memory_reserved(device),
    )
    yield _gauge("patchd_gpu_memory_used_bytes", "bytes in use on the device (all processes)", total - free)
    yield _gauge("patchd_gpu_memory_total_bytes", "the device's memory", total)


class HealthServer:
    """/livez, /readyz and /metrics for one Service on host:port (port 0: the OS picks one)."""

    def __init__(self, service: Monitored, host: str, port: int):
        self.service = service
        self.host = host
        self.requested_port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServiceCollector(service, self))
        ProcessCollector(registry=self.registry)  # CPU seconds, resident memory, open fds, start time
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._db_checked = 0.0
        self._db_ok = False
        self._db_lock = threading.Lock()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> HealthServer:
        """Bind (an address in use raises OSError: fail fast) and serve in a daemon thread."""
        server_cls = _Server6 if ":" in self.host else ThreadingHTTPServer
        self._server = server_cls((self.host, self.requested_port), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, name="patchd-health", daemon=True)
        self._thread.start()
        log.info("health endpoint listening", url=self.url, paths=["/livez", "/readyz", "/metrics"])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ------------------------------------------------------------------ checks

    def livez(self) -> tuple[bool, dict[str, Any]]:
        s = self.service
        age = time.monotonic() - s.heartbeat
        if s.phase in UNWATCHED_PHASES:
            ok = True
        else:
            ok = s.phase != "stopped" and age < LIVE_STALE_S
        return ok, {"live": ok, "phase": s.phase, "heartbeat_age_s": round(age, 3), "stale_after_s": LIVE_STALE_S}

    def readyz(self) -> tuple[bool, dict[str, Any]]:
        s = self.service
        consumer = s.consumer
        checks = {
            "running": s.phase == "running",
            "model": s.model is not None,
            "consumer_assigned": bool(consumer is not None and consumer.stats.assigned > 0),
            # the assignment outlives a broker that went away: the consumer's own lookups tell
            "broker": bool(consumer is not None and consumer.stats.broker_reachable),
            "database": s.store is not None and self.database_ok(),
            # no partition stopped on an undecodable batch (daemon/quarantine.py): it waits for an operator
            "partitions_flowing": not (consumer is not None and consumer.quarantine.stuck),
        }
        ok = all(checks.values())
        body: dict[str, Any] = {"ready": ok, "phase": s.phase, "checks": checks}
        if consumer is not None and consumer.quarantine.stuck:
            body["stuck_partitions"] = consumer.quarantine.describe()
        return ok, body

    def database_ok(self, force: bool = False) -> bool:
        """SELECT 1 on the daemon's store, cached for DB_CHECK_TTL_S unless forced."""
        with self._db_lock:
            now = time.monotonic()
            if force or now - self._db_checked > DB_CHECK_TTL_S:
                self._db_ok = _ping(self.service.store)
                self._db_checked = now
            return self._db_ok

    def metrics(self) -> bytes:
        return generate_latest(self.registry)


def _ping(store: Store | None) -> bool:
    if store is None:
        return False
    try:
        store.ping()
    except Exception as exc:  # noqa: BLE001 - unreachable, locked, dropped: all mean "not ready"
        log.warning("database check failed", error=repr(exc))
        return False
    return True


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _handler(health: HealthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "patchd"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            try:
                if path == "/livez":
                    self._json(*health.livez())
                elif path == "/readyz":
                    self._json(*health.readyz())
                elif path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, health.metrics())
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found: try /livez /readyz /metrics\n")
            except Exception as exc:  # noqa: BLE001 - a probe gets a 500, the daemon goes on
                log.exception("health request failed", path=path)
                self._send(500, "text/plain; charset=utf-8", f"{type(exc).__name__}: {exc}\n".encode())

        def _json(self, ok: bool, body: dict[str, Any]) -> None:
            self._send(200 if ok else 503, "application/json", json.dumps(body).encode() + b"\n")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass  # probes every few seconds would flood the journal

    return Handler
