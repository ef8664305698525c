"""daemon/health.py over real HTTP, on a stand-in for the Service (the daemon itself: test_daemon_health.py)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from kafka import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from daemon.consumer import IngestStats
from daemon.health import LIVE_STALE_S, HealthServer
from daemon.quarantine import Quarantine
from daemon.settings import load_settings
from daemon.worker import EditTiming, WorkerStats
from memory.store import Store


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metrics(url: str) -> dict[str, float]:
    """Every sample as 'name{label="v",...}' -> value."""
    status, body = get(url + "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


@pytest.fixture
def service(tmp_path: Path) -> Iterator[SimpleNamespace]:
    settings = load_settings(None, {"HOME": str(tmp_path), "PATCHD_MODEL_NAME": "tiny"})
    with Store.open(settings.database.url) as store:
        stats = IngestStats(records=12, new_reports=7, duplicates=3, rejected=2, assigned=1, lag=4)
        stats.rejected_by_reason["bad_json"] = 2
        worker = SimpleNamespace(stats=WorkerStats(outcomes=Counter(patched=2, gate_rejected=1, already_fixed=1)))
        worker.stats.gate_failures.update(["locality"])
        worker.stats.timings += [
            EditTiming(1, "patched", 40.0),
            EditTiming(2, "patched", 700.0),
            EditTiming(3, "gate_rejected", 3000.0),
            EditTiming(4, "already_fixed", 5.0),  # a forward pass, not an edit
        ]
        yield SimpleNamespace(
            settings=settings,
            store=store,
            model=object(),
            consumer=SimpleNamespace(stats=stats, paused=False, quarantine=_quarantine(store)),
            worker=worker,
            phase="running",
            heartbeat=time.monotonic(),
        )


def _quarantine(store: Store) -> Quarantine:
    """The consumer's real stuck-partition bookkeeping, with no Kafka client behind it."""
    return Quarantine(store, "tiny", dead_letter=lambda *a: None, commit=lambda o: True, stop=threading.Event())


@pytest.fixture
def health(service: SimpleNamespace) -> Iterator[HealthServer]:
    server = HealthServer(service, "127.0.0.1", 0).start()  # port 0: the OS picks a free one
    yield server
    server.stop()


def test_livez_follows_the_main_loop_heartbeat(service: SimpleNamespace, health: HealthServer) -> None:
    status, body = get(health.url + "/livez")
    assert status == 200 and json.loads(body)["live"] is True
    service.heartbeat = time.monotonic() - LIVE_STALE_S - 1  # the loop is stuck
    status, body = get(health.url + "/livez")
    assert status == 503 and json.loads(body)["heartbeat_age_s"] > LIVE_STALE_S
    service.phase = "loading"  # start-up is watched by systemd's start timeout, not by this probe
    assert get(health.url + "/livez")[0] == 200
    assert get(health.url + "/nope")[0] == 404


def test_readyz_needs_model_partitions_and_database(service: SimpleNamespace, health: HealthServer) -> None:
    status, body = get(health.url + "/readyz")
    assert status == 200, body
    service.consumer.stats.assigned = 0  # a rebalance took every partition away
    status, body = get(health.url + "/readyz")
    assert status == 503 and json.loads(body)["checks"] == {
        "running": True,
        "model": True,
        "consumer_assigned": False,
        "broker": True,
        "database": True,
        "partitions_flowing": True,
    }
    service.consumer.stats.assigned = 1
    # a partition stopped on an undecodable batch: not ready, and the body says where
    quarantine = service.consumer.quarantine
    record = service.store.record_stuck("tiny", "corrections", 3, 81, "CorruptRecordError: crc")
    quarantine.stuck[TopicPartition("corrections", 3)] = record
    status, body = get(health.url + "/readyz")
    ready = json.loads(body)
    assert status == 503 and ready["checks"]["partitions_flowing"] is False
    assert [(s["topic"], s["partition"], s["offset"]) for s in ready["stuck_partitions"]] == [("corrections", 3, 81)]
    m = metrics(health.url)
    assert m["patchd_consumer_stuck_partitions"] == 1
    assert m['patchd_consumer_stuck_offset{partition="3",topic="corrections"}'] == 81
    quarantine.stuck.clear()
    service.consumer.stats.broker_reachable = False  # the assignment stays; the broker's lookups fail
    status, body = get(health.url + "/readyz")
    assert status == 503 and json.loads(body)["checks"]["broker"] is False
    service.consumer.stats.broker_reachable = True
    assert get(health.url + "/readyz")[0] == 200
    service.phase = "standby"
    assert get(health.url + "/readyz")[0] == 503


def test_metrics_report_the_daemon_counts(service: SimpleNamespace, health: HealthServer) -> None:
    m = metrics(health.url)
    assert m["patchd_events_consumed_total"] == 12
    assert m['patchd_reports_total{result="new"}'] == 7 and m['patchd_reports_total{result="duplicate"}'] == 3
    assert m['patchd_events_rejected_total{reason="bad_json"}'] == 2
    assert m['patchd_patches_total{result="accepted"}'] == 2 and m['patchd_patches_total{result="rejected"}'] == 1
    assert m['patchd_gate_failures_total{reason="locality"}'] == 1
    assert m["patchd_edit_duration_seconds_count"] == 3 and m["patchd_edit_duration_seconds_sum"] == pytest.approx(3.74)
    assert m['patchd_edit_duration_seconds_bucket{le="0.05"}'] == 1
    assert m['patchd_edit_duration_seconds_bucket{le="1.0"}'] == 2
    assert m["patchd_consumer_lag"] == 4 and m["patchd_consumer_assigned_partitions"] == 1
    assert m["patchd_database_up"] == 1 and m["patchd_backlog"] == 0
    assert m['patchd_mistakes{status="patched"}'] == 0
    assert "patchd_last_published_version" not in m  # nothing published yet
    assert m["patchd_ready"] == 1 and m["patchd_live"] == 1
    assert "process_resident_memory_bytes" in m

    service.store.add_version("tiny", 3, 2, "ab" * 32, [1, 2])
    service.worker.stats.timings.append(EditTiming(5, "patched", 200.0))  # new timings are folded in
    m = metrics(health.url)
    assert m["patchd_last_published_version"] == 3
    assert abs(m["patchd_last_published_timestamp_seconds"] - time.time()) < 60
    assert m["patchd_edit_duration_seconds_count"] == 4


def test_two_servers_in_one_process_have_their_own_registries(service: SimpleNamespace) -> None:
    a = HealthServer(service, "127.0.0.1", 0).start()
    b = HealthServer(service, "127.0.0.1", 0).start()
    try:
        assert a.port != b.port
        assert metrics(a.url)["patchd_events_consumed_total"] == metrics(b.url)["patchd_events_consumed_total"]
    finally:
        a.stop()
        b.stop()
