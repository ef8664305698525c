"""The real Kafka broker: kafka-python round trip, and deploy/kafka/broker.sh's commands."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from daemon.tools.broker import BrokerScript


def _consume(bootstrap: str, topic: str, count: int, group: str, timeout_s: float = 30.0) -> list:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    records: list = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(records) < count and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        if records:
            consumer.commit()
            tp = TopicPartition(topic, 0)
            assert consumer.committed(tp) == records[-1].offset + 1
    finally:
        consumer.close()
    return records


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        for i, value in enumerate(values):
            producer.send(topic, value=value, key=f"k{i}".encode(), headers=[("source", b"test")]).get(timeout=30)
    finally:
        producer.close()


def test_produce_and_consume(kafka_bootstrap: str, kafka_topic: str) -> None:
    values = [f'{{"id": "e{i}", "n": {i}}}'.encode() for i in range(5)] + ["ünïcode".encode()]
    _produce(kafka_bootstrap, kafka_topic, values)

    records = _consume(kafka_bootstrap, kafka_topic, len(values), group=f"{kafka_topic}-g")

    assert [r.value for r in records] == values
    assert [r.offset for r in records] == list(range(len(values)))
    assert records[0].key == b"k0"
    assert records[0].headers == [("source", b"test")]


def test_topic_factory_makes_distinct_topics(kafka_admin, kafka_topic_factory: Callable[..., str]) -> None:
    first = kafka_topic_factory()
    second = kafka_topic_factory(partitions=3)
    dlq = kafka_topic_factory(f"{first}.dlq")
    assert len({first, second, dlq}) == 3
    # kafka-python names the key "name" (newer Metadata schemas) or "topic" (older ones)
    described = {t.get("name", t.get("topic")): t for t in kafka_admin.describe_topics([second])}
    assert len(described[second]["partitions"]) == 3


def test_fetch_is_a_no_op_when_cached(kafka_bootstrap: str, tmp_path: Path) -> None:
    # the session broker has fetched the jars already; a second fetch must not call Maven
    started = time.monotonic()
    result = BrokerScript(port=1, controller_port=2, state_dir=tmp_path).run("fetch", timeout=30)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 5


def test_unknown_command_is_a_usage_error(tmp_path: Path) -> None:
    result = BrokerScript(port=1, controller_port=2, state_dir=tmp_path).run("restart", timeout=10)
    assert result.returncode == 2
    assert "usage" in result.stderr


def test_broker_script_lifecycle(kafka_broker: BrokerScript | None, kafka_bootstrap: str, tmp_path: Path) -> None:
    """status/start/stop through broker.sh, and data kept across a restart.

    Runs on the session's broker (a restart costs one JVM start, a second broker two); only with
    an external broker (PATCHD_TEST_BOOTSTRAP) does it start one of its own.
    """
    own = kafka_broker is None
    broker = kafka_broker or BrokerScript.on_free_ports(tmp_path / "state")
    try:
        if own:
            assert broker.run("status").returncode == 3  # never started: stopped
            assert broker.start() == broker.bootstrap
        status = broker.run("status")
        assert status.returncode == 0 and "running" in status.stdout, status.stdout + status.stderr

        # start is idempotent: a running broker is left alone and its address printed again
        again = time.monotonic()
        assert broker.start() == broker.bootstrap
        assert time.monotonic() - again < 10

        # a second state dir cannot take a port that a broker already serves
        intruder = BrokerScript(broker.port, broker.controller_port, tmp_path / "other").run("start")
        assert intruder.returncode == 1 and "already serves" in intruder.stderr

        topic = f"persisted-{time.time_ns()}"
        _produce(broker.bootstrap, topic, [b"before-restart"])
        broker.stop()
        assert broker.run("status").returncode == 3
        assert not (broker.state_dir / "broker.pid").exists()
        assert "stopped" in broker.run("stop").stdout  # stopping a stopped broker is fine

        assert broker.start() == broker.bootstrap  # restart on the formatted storage
        records = _consume(broker.bootstrap, topic, 1, group=f"{topic}-g")
        assert [r.value for r in records] == [b"before-restart"]
    finally:
        if own:
            broker.stop()
        elif broker.run("status").returncode != 0:
            broker.start()  # leave the session's broker running for the tests after this one
