"""Kafka fixtures: one real Apache Kafka broker per test session, and a fresh topic per test.

The broker is the one `deploy/kafka/broker.sh` runs in development (launched by daemon/tools/broker.py,
shared with the demo and the benchmarks) (KRaft combined mode on
127.0.0.1), started on free ports with a private state directory, unless
`PATCHD_TEST_BOOTSTRAP=host:port` names a running broker. A broker that cannot start fails
the tests that need it; Kafka tests are never skipped.

Fixtures:
  kafka_broker         (session) the BrokerScript this session started (None for an external broker)
  kafka_bootstrap      (session) "127.0.0.1:PORT"
  kafka_admin          (session) a KafkaAdminClient on that broker
  kafka_topic_factory  (test)    make_topic(name=None, partitions=1) -> a new, empty topic's name
  kafka_topic          (test)    one new topic's name
Tests that use kafka_bootstrap (directly or through the others) get the `kafka` marker.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from kafka import KafkaAdminClient
from kafka.admin import NewTopic

from daemon.tools.broker import BrokerError, BrokerScript


def _wait_for_external(bootstrap: str, timeout_s: float = 30.0) -> None:
    """Fail (not skip) unless the broker named by PATCHD_TEST_BOOTSTRAP answers."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
            try:
                admin.describe_cluster()
                return
            finally:
                admin.close()
        except Exception as exc:  # any client error means "not yet"; the last one is reported
            last = exc
            time.sleep(1.0)
    pytest.fail(f"PATCHD_TEST_BOOTSTRAP={bootstrap}: no Kafka broker answered within {timeout_s}s ({last})")


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerScript | None]:
    """The broker this session started, or None when PATCHD_TEST_BOOTSTRAP names one."""
    external = os.environ.get("PATCHD_TEST_BOOTSTRAP", "").strip()
    if external:
        _wait_for_external(external)
        yield None
        return
    broker = BrokerScript.on_free_ports(tmp_path_factory.mktemp("kafka-broker"))
    try:
        broker.start()
    except (BrokerError, subprocess.TimeoutExpired) as exc:
        # pytest caches a session fixture's failure: the broker is tried once, every Kafka test fails
        pytest.fail(f"the test Kafka broker did not start: {exc}", pytrace=False)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: BrokerScript | None) -> str:
    return kafka_broker.bootstrap if kafka_broker else os.environ["PATCHD_TEST_BOOTSTRAP"].strip()


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> Iterator[KafkaAdminClient]:
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="patchd-tests")
    try:
        yield admin
    finally:
        admin.close()


def _slug(text: str) -> str:
    # topic names allow [A-Za-z0-9._-] up to 249 characters; keep the test's name readable
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:80]


@pytest.fixture
def kafka_topic_factory(kafka_admin: KafkaAdminClient, request: pytest.FixtureRequest) -> Callable[..., str]:
    """make_topic(name=None, partitions=1): create a topic and return its name.

    Without a name it is unique to this test ("t-<test>-<random>"); pass a name to derive one,
    e.g. make_topic(f"{topic}.dlq").
    """

    def make_topic(name: str | None = None, partitions: int = 1) -> str:
        topic = name or f"t-{_slug(request.node.name)}-{uuid.uuid4().hex[:8]}"
        kafka_admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
        _until_described(kafka_admin, topic, partitions)
        return topic

    return make_topic


def _until_described(admin: KafkaAdminClient, topic: str, partitions: int, timeout_s: float = 30.0) -> None:
    """Wait until the broker's metadata lists every partition of a new topic with a leader.

    create_topics returns once the controller has the topic; a consumer group that joins before the
    broker's metadata has it gets no partitions (kafka-python's range assignor logs "No partition
    metadata") and may sit unassigned past a test's timeout on a loaded machine.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        described = admin.describe_topics([topic])
        parts = described[0].get("partitions", []) if described else []
        if (
            described
            and described[0].get("error_code") == 0
            and len(parts) == partitions
            and all(p.get("error_code") == 0 and p.get("leader_id", -1) >= 0 for p in parts)
        ):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {topic}: {partitions} partitions not in the broker's metadata in {timeout_s}s")
        time.sleep(0.1)


@pytest.fixture
def kafka_topic(kafka_topic_factory: Callable[..., str]) -> str:
    return kafka_topic_factory()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # `-m kafka` / `-m "not kafka"` select by need, without every test remembering the marker
    for item in items:
        if "kafka_bootstrap" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kafka)
