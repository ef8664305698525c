"""A broker restart in the middle of the stream: the daemon reconnects and finishes, nothing lost,
and /readyz says it is not ready while the broker is away.

This test stops and starts its own broker (deploy/kafka/broker.sh on free ports), never the
session's, which other tests share.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaAdminClient
from kafka.admin import NewTopic

from daemon import cli
from daemon.settings import load_settings
from daemon.tools.broker import BrokerScript, free_ports
from memory.store import Store
from tests.tinybase import (
    Daemon,
    assert_final_state,
    committed,
    correction_stream,
    event_ids,
    prepare,
    produce,
    read_topic,
    write_config,
)


@pytest.fixture
def own_broker(tmp_path: Path, kafka_broker: BrokerScript | None) -> Iterator[BrokerScript]:
    # kafka_broker first: the session broker has fetched the jars, so this start only runs a JVM
    broker = BrokerScript.on_free_ports(tmp_path / "broker")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise TimeoutError(f"{what} not reached within {timeout_s}s")


def test_broker_restart_mid_stream(
    own_broker: BrokerScript, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bootstrap = own_broker.bootstrap
    topic = "corrections"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, 1, 1), NewTopic(f"{topic}.dlq", 1, 1)])
    admin.close()
    stream = correction_stream(seed=3)

    # both reports of every conflicting pair come before the restart: the worker starts once the
    # first part is stored and runs while the second arrives in batches, so a pair split across
    # the two parts (or two batches) could be decided on its first report alone
    def conflicted(value: bytes) -> bool:
        try:
            return json.loads(value).get("input") in stream.conflicting
        except ValueError:
            return False

    rest = [v for v in stream.values if not conflicted(v)]
    first = [v for v in stream.values if conflicted(v)] + rest[:110]
    second = rest[110:]
    half = len(first)
    produce(bootstrap, topic, first)

    base, data = prepare(tmp_path / "tiny")
    config = write_config(
        tmp_path / "patchd.toml",
        base=base,
        data=data,
        bootstrap=bootstrap,
        topic=topic,
        state=tmp_path / "state",
        poll_max_records=50,
        health_port=(port := free_ports(1)[0]),
    )
    settings = load_settings(config, {})

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    daemon = Daemon(config)  # the daemon proper, not --once
    stored = 0
    while stored < half:
        assert daemon.wait_for(("batch stored",), timeout_s=120)
        stored += daemon.log[-1]["records"]

    _wait(ready, 60, "ready before the broker goes away")
    own_broker.stop()  # mid-stream: the second half is not produced yet
    # the daemon polls, commits and dead-letters against a dead broker meanwhile; kafka-python keeps
    # its assignment, so only the consumer's failing lookups can tell readiness the broker is gone
    _wait(lambda: not ready(), 60, "/readyz 503 while the broker is away")
    assert daemon.proc.poll() is None, "the daemon must survive the broker going away"
    own_broker.start()
    _wait(ready, 60, "ready again once the broker is back")
    produce(bootstrap, topic, second)

    def done() -> bool:
        capsys.readouterr()
        cli.main(["status", "--json", "--config", str(config)])
        report = json.loads(capsys.readouterr().out)
        return (
            report["reports"] == len(stream.valid_ids)
            and report["backlog"] == 0
            and report["mistakes"]["patching"] == 0
        )

    _wait(done, 120, "every report stored and patched")
    _wait(
        lambda: committed(bootstrap, settings.kafka.group_id) == {0: len(stream.values)},
        60,
        "offsets committed to the end",
    )
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.finish(timeout_s=60) == 0

    dlq = read_topic(bootstrap, f"{topic}.dlq", 60, timeout_s=5)
    with Store.open(settings.database.url) as store:
        assert event_ids(store) == stream.valid_ids
        assert_final_state(store, stream, dlq)
