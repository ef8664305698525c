"""A running daemon seen as systemd and Prometheus see it: notify datagrams, /livez /readyz /metrics.

The daemon runs as `python -m daemon run` (a child process, as the unit runs it) on the real broker
with the tiny base; systemd's side is a bound abstract datagram socket in this process. The
standby test runs the Service in-process, with the model's lock held by the test.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon import service as service_module
from daemon.notify import Notifier
from daemon.service import Service
from daemon.settings import load_settings
from daemon.tools.broker import free_ports
from memory.lock import ModelLock
from memory.store import Store
from tests.test_health import get, metrics
from tests.tinybase import MODEL, Daemon, correction_stream, prepare, produce, write_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return prepare(tmp_path_factory.mktemp("tiny"))


class NotifySocket:
    """systemd's end of $NOTIFY_SOCKET (abstract), collecting datagrams in a thread."""

    def __init__(self) -> None:
        self.name = f"@patchd-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s}s")
        time.sleep(0.2)


def test_running_daemon_notifies_systemd_and_serves_probes_and_metrics(
    tiny,
    tmp_path: Path,
    kafka_bootstrap: str,
    kafka_topic_factory: Callable[..., str],
    notify_socket: NotifySocket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, data = tiny
    topic = kafka_topic_factory()
    kafka_topic_factory(f"{topic}.dlq")
    stream = correction_stream(seed=4)
    produce(kafka_bootstrap, topic, stream.values)
    (port,) = free_ports(1)
    config = write_config(
        tmp_path / "p.toml",
        base=base,
        data=data,
        bootstrap=kafka_bootstrap,
        topic=topic,
        state=tmp_path / "state",
        health_port=port,
    )
    settings = load_settings(config, {})
    with Store.open(settings.database.url) as store:  # a version "published" before this start
        store.add_version(MODEL, 1, None, "0" * 64, [])
    url = f"http://127.0.0.1:{port}"

    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.name)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # WatchdogSec=1: a ping every 0.5 s
    daemon = Daemon(config)
    try:
        wait_until(lambda: _status(url + "/readyz") == 200, "/readyz 200")
        assert get(url + "/livez")[0] == 200
        assert "READY=1\nSTATUS=patching tiny from " + topic in notify_socket.messages

        def progressed() -> bool:
            m = metrics(url)
            return m["patchd_events_consumed_total"] == 300 and sum(_series(m, "patchd_mistakes_done_total")) >= 3

        wait_until(progressed, "all 300 events stored and 3 mistakes done")
        # a quiet machine can finish the stream within one watchdog interval: let two pings arrive
        wait_until(lambda: notify_socket.messages.count("WATCHDOG=1") >= 2, "two WATCHDOG=1 pings")
        # the accepted patches are published (at most every publish_interval) after the pre-start version 1
        wait_until(lambda: _latest(settings.database.url) >= 2, "the daemon's first publish (version 2)")
        before = _latest(settings.database.url)
        m = metrics(url)
        after = _latest(settings.database.url)
        assert m['patchd_reports_total{result="new"}'] == len(stream.valid_ids)
        rejected = {k.split('"')[1]: v for k, v in m.items() if k.startswith("patchd_events_rejected_total{")}
        assert rejected == dict(stream.malformed)
        assert sum(_series(m, "patchd_mistakes{")) == len(stream.inputs) + len(stream.conflicting)
        trained = m['patchd_patches_total{result="accepted"}'] + m['patchd_patches_total{result="rejected"}']
        assert m["patchd_edit_duration_seconds_count"] == trained
        assert before <= m["patchd_last_published_version"] <= after  # read from the database per scrape
        assert m["patchd_consumer_assigned_partitions"] == 1 and m["patchd_database_up"] == 1
        assert not any(k.startswith("patchd_gpu_") for k in m)  # a CPU daemon
    finally:
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.finish(timeout_s=60) == 0

    stopped = daemon.events("patchd stopped")
    assert stopped and stopped[0]["ingest"]["rejected_by_reason"] == dict(stream.malformed)
    assert not daemon.events("health snapshot not written")
    messages = notify_socket.messages
    first = next(i for i, msg in enumerate(messages) if msg.startswith("READY=1"))
    assert any(msg.startswith("EXTEND_TIMEOUT_USEC=") for msg in messages[:first])  # while loading
    assert "WATCHDOG=1" not in messages[:first]  # systemd arms the watchdog at READY=1
    assert messages.count("WATCHDOG=1") >= 2
    assert messages[-1].startswith("STOPPING=1")


def test_standby_waits_for_the_model_lock_then_takes_over(
    tiny, tmp_path: Path, kafka_bootstrap: str, kafka_topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, data = tiny
    (port,) = free_ports(1)
    config = write_config(
        tmp_path / "p.toml",
        base=base,
        data=data,
        bootstrap=kafka_bootstrap,
        topic=kafka_topic,
        state=tmp_path / "state",
        health_port=port,
    )
    settings = load_settings(config, {})
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setattr(service_module, "LOCK_POLL_S", 0.2)
    active = ModelLock(settings.database.url, MODEL)  # "another daemon" holds this model
    assert active.try_acquire()
    notify = NotifySocket()
    service = Service(settings, handle_signals=False)
    service.notifier = Notifier({"NOTIFY_SOCKET": notify.name})
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(service.run()), daemon=True)
    thread.start()
    try:
        wait_until(lambda: service.phase == "standby", "standby", 30)
        status, body = get(url + "/readyz")
        assert status == 503 and json.loads(body)["phase"] == "standby"
        assert get(url + "/livez")[0] == 200
        wait_until(lambda: any("STATUS=standby" in m for m in notify.messages), "READY=1 STATUS=standby", 10)
        assert service.model is None  # nothing loaded while standing by

        active.release()  # the active daemon exits
        wait_until(lambda: _status(url + "/readyz") == 200, "the standby took over")
        assert service.lock is not None and service.lock.held()
        assert not ModelLock(settings.database.url, MODEL).try_acquire()
    finally:
        service.request_stop()
        thread.join(timeout=60)
        active.release()
        notify.close()
    assert result == [0]


def _latest(database_url: str) -> int:
    with Store.open(database_url) as store:
        latest = store.latest_version(MODEL)
    return 0 if latest is None else latest.number


def _status(url: str) -> int:
    try:
        return get(url)[0]
    except OSError:  # not listening yet
        return 0


def _series(m: dict[str, float], prefix: str) -> list[float]:
    return [v for k, v in m.items() if k.startswith(prefix)]
