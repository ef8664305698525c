"""Daemon benchmarks: `patchd bench ingest` (Kafka -> database) and `patchd bench daemon` (real edits).

Both run the daemon's own code (daemon/consumer.py, daemon/service.py) against a real broker:
the one named by --bootstrap, or a private one started with deploy/kafka/broker.sh on free ports.
Events are produced first with a separate kafka-python producer; only the daemon is timed.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from daemon.logs import get_logger
from daemon.tools.broker import broker, create_topics
from patching.eval.metrics import percentile

log = get_logger(__name__)

FEVER_LABELS = ("SUPPORTS", "REFUTES")


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    from kafka import KafkaProducer

    create_topics(bootstrap, topic, (".dlq",))
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024)
    try:
        for value in values:
            producer.send(topic, value=value)
        producer.flush(timeout=120)
    finally:
        producer.close()


def _settings(bootstrap: str, topic: str, state: Path, model: str, **kafka: Any) -> Any:
    from daemon.settings import load_settings

    env = {
        "HOME": str(state),
        "PATCHD_STATE_DIR": str(state),
        "PATCHD_MODEL_NAME": model,
        "PATCHD_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "PATCHD_KAFKA_TOPIC": topic,
        "PATCHD_DEVICE": os.environ.get("PATCHD_DEVICE", "auto"),
        "PATCHD_MODEL_DTYPE": os.environ.get("PATCHD_MODEL_DTYPE", "auto"),
        "PATCHD_HEALTH_PORT": "0",  # no probes in a benchmark, and no clash with a daemon on the port
        # one producer ("bench") sends every correction: a trusted channel, not a flood
        "PATCHD_POLICY_REPORTER_RATE_LIMIT": "1000000",
    }
    settings = load_settings(None, env)
    return replace(settings, kafka=replace(settings.kafka, **kafka)) if kafka else settings


def machine_facts() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "processor": platform.machine(),
    }


# ---------------------------------------------------------------------------- ingest


def ingest_events(n: int, duplicate_share: float = 0.3, seed: int = 0) -> list[bytes]:
    """`n` deliveries: `duplicate_share` are re-sends of earlier events (same id), a fifth recur."""
    rng = random.Random(seed)
    unique: list[bytes] = []
    inputs: list[str] = []
    for i in range(n - round(n * duplicate_share)):
        text = rng.choice(inputs) if inputs and rng.random() < 0.2 else f"claim {i} about thing {rng.random():.6f}"
        inputs.append(text)
        unique.append(
            json.dumps(
                {
                    "id": f"ingest-{seed}-{i}",
                    "model": "bench",
                    "input": text,
                    "target": rng.choice(FEVER_LABELS),
                    "reporter": f"r{rng.randrange(200)}",
                }
            ).encode()
        )
    deliveries = unique + [rng.choice(unique) for _ in range(n - len(unique))]
    rng.shuffle(deliveries)
    return deliveries


def run_ingest_bench(
    events: int, bootstrap: str | None = None, batch: int = 500, database_url: str | None = None
) -> dict[str, Any]:
    from daemon.consumer import Consumer
    from memory.store import Store

    values = ingest_events(events)
    with broker(bootstrap) as address, tempfile.TemporaryDirectory(prefix="patchd-bench-ingest-") as state:
        topic = f"bench-ingest-{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        produce(address, topic, values)
        produce_s = time.perf_counter() - t0
        print(f"produced {events:,} events in {produce_s:.1f}s; consuming ...", flush=True)
        # ingest alone: no worker drains the queue, so backpressure is off (it would pause at once)
        settings = _settings(address, topic, Path(state), "bench", poll_max_records=batch, max_pending=10**9)
        store = Store.open(database_url or settings.database.url)
        consumer = Consumer(settings, store, FEVER_LABELS)
        try:
            consumer.connect()
            t0 = time.perf_counter()
            while consumer.stats.records < events:
                consumer.step()
                if time.perf_counter() - t0 > 600:
                    raise TimeoutError(f"only {consumer.stats.records} of {events} events in 600 s")
            seconds = time.perf_counter() - t0
            stats = consumer.stats
            counts = store.table_counts()
        finally:
            consumer.close()
            store.close()
    distinct = len(set(values))
    assert stats.new_reports == distinct == counts["reports"], (stats, distinct, counts)
    return {
        "events": events,
        "distinct_events": distinct,
        "duplicates": stats.duplicates,
        "mistakes": counts["mistakes"],
        "batch_size": batch,
        "batches": stats.batches,
        "seconds": round(seconds, 3),
        "events_per_s": round(events / seconds, 1),
        "produce_seconds": round(produce_s, 2),
        "database": store.backend,
        "machine": machine_facts(),
    }


# ---------------------------------------------------------------------------- real edits


def run_daemon_bench(corrections: int, base: str = "fever-minilm", bootstrap: str | None = None) -> dict[str, Any]:
    """`corrections` FEVER claims the base gets wrong, as events through `patchd run --once`."""
    from daemon.service import Service
    from memory.store import Store
    from patching.bases.datasets import load_task
    from patching.bases.load import load_base
    from patching.bases.tasks import TaskAdapter

    t0 = time.perf_counter()
    lb = load_base(base)
    wrong = TaskAdapter(lb).mistakes(load_task("fever").edit, limit=corrections, progress=False)
    print(f"{len(wrong)} fever claims {base} gets wrong ({time.perf_counter() - t0:.1f}s to find)", flush=True)
    del lb
    values = [
        json.dumps(
            {"id": f"fever-{i}", "model": base, "input": ex.input, "target": ex.target, "reporter": "bench"}
        ).encode()
        for i, ex in enumerate(wrong)
    ]
    with broker(bootstrap) as address, tempfile.TemporaryDirectory(prefix="patchd-bench-daemon-") as state:
        topic = f"bench-daemon-{uuid.uuid4().hex[:8]}"
        produce(address, topic, values)
        settings = _settings(address, topic, Path(state), base)
        service = Service(settings, once=True, handle_signals=False)
        assert service.run() == 0, "the daemon failed; see its log"
        with Store.open(settings.database.url) as store:
            statuses = {str(k): v for k, v in store.status_counts(base).items() if v}
            reports = store.table_counts()["reports"]
    assert service.worker is not None and service.model is not None
    timings = service.worker.stats.timings
    edit_ms = [t.ms for t in timings]
    patch_ms = [t.ms for t in timings if t.outcome in ("patched", "gate_rejected")]
    lost = sum(v for k, v in statuses.items() if k not in ("patched", "gate_rejected", "already_fixed"))
    return {
        "base": base,
        "corrections": len(values),
        "reports_stored": reports,
        "mistakes": statuses,
        "accepted": statuses.get("patched", 0),
        "rejected": statuses.get("gate_rejected", 0),
        "already_fixed": statuses.get("already_fixed", 0),
        "lost": lost,
        "per_edit_ms": _summary(edit_ms),
        "per_trained_edit_ms": _summary(patch_ms),
        "attempts_max": max((t.attempts for t in timings), default=0),
        "startup_seconds": round(service.timings["startup_s"], 2),
        "model_setup_seconds": round(service.model.setup_seconds, 2),
        "end_to_end_seconds": round(service.timings["total_s"], 2),
        "patching_seconds": round(service.timings["total_s"] - service.timings["startup_s"], 2),
        "device": str(service.model.patcher.memory.device),
        "memory_rows": len(service.model.patcher.memory),
        "machine": machine_facts(),
        "edits": [t.__dict__ for t in timings],
    }


def _summary(ms: list[float]) -> dict[str, float | int]:
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "median": round(statistics.median(ms), 1),
        "p95": round(cast(float, percentile(ms, 0.95)), 1),  # a float: ms is not empty
        "mean": round(statistics.fmean(ms), 1),
        "max": round(max(ms), 1),
    }
