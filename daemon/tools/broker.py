"""The one local Kafka broker launcher, shared by the tests, the demo and the benchmarks.

`deploy/kafka/broker.sh` is the broker (a real Apache Kafka in KRaft combined mode on 127.0.0.1,
from Maven Central jars); this module starts and stops it on free ports with a private state
directory, and creates topics on it.

    BrokerScript.on_free_ports(state_dir).start()   # the test fixtures (one broker per session)
    with broker(None) as address: ...                # demo / benchmarks: a private broker, stopped after
    create_topics(address, "corrections", extra=(".dlq", ".releases"))
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

BROKER_SH = Path(__file__).resolve().parents[2] / "deploy" / "kafka" / "broker.sh"
# a cold JVM plus storage format takes ~7 s on an idle 2-core machine; leave room for a loaded one
START_TIMEOUT_S = 180
# a clean KRaft shutdown takes ~2 s; the script itself kills after its own timeout (60 s)
STOP_TIMEOUT_S = 90


class BrokerError(RuntimeError):
    """broker.sh failed; the message carries its output (and so the broker log's tail)."""


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (all bound at once, so they differ)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class BrokerScript:
    """One broker instance as deploy/kafka/broker.sh sees it: its ports and state directory."""

    port: int
    controller_port: int
    state_dir: Path

    @classmethod
    def on_free_ports(cls, state_dir: Path) -> BrokerScript:
        port, controller_port = free_ports(2)
        return cls(port=port, controller_port=controller_port, state_dir=state_dir)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            KAFKA_PORT=str(self.port),
            KAFKA_CONTROLLER_PORT=str(self.controller_port),
            KAFKA_STATE_DIR=str(self.state_dir),
        )
        return env

    def run(self, command: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(BROKER_SH), command],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def start(self) -> str:
        """Start the broker and return once it answers; the last line broker.sh printed."""
        result = self.run("start", START_TIMEOUT_S)
        if result.returncode != 0:
            raise BrokerError(
                f"deploy/kafka/broker.sh start failed (exit {result.returncode}) on port {self.port}, "
                f"state {self.state_dir}:\n{result.stdout}{result.stderr}"
            )
        return result.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        result = self.run("stop", STOP_TIMEOUT_S)
        if result.returncode != 0:
            raise BrokerError(f"deploy/kafka/broker.sh stop failed:\n{result.stdout}{result.stderr}")


@contextmanager
def broker(bootstrap: str | None, state_dir: Path | None = None) -> Iterator[str]:
    """The given broker, or a private one (broker.sh on free ports), stopped afterwards.

    The private broker keeps its data in `state_dir` (default: a temporary directory, removed after).
    """
    if bootstrap:
        yield bootstrap
        return
    scratch = tempfile.TemporaryDirectory(prefix="patchd-kafka-") if state_dir is None else None
    with scratch or nullcontext(str(state_dir)) as state:
        script = BrokerScript.on_free_ports(Path(state))
        print(f"starting a private Kafka broker on {script.bootstrap} ...", flush=True)
        script.start()
        try:
            yield script.bootstrap
        finally:
            try:
                script.stop()
            except (BrokerError, subprocess.TimeoutExpired) as exc:  # the caller's own error matters more
                print(f"stopping the private Kafka broker failed: {exc}", flush=True)


def create_topics(bootstrap: str, topic: str, suffixes: Iterable[str] = (".dlq", ".releases")) -> None:
    """`topic` and `topic + suffix` for each suffix, one partition each (the daemon's DLQ and releases)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(t, 1, 1) for t in (topic, *(topic + s for s in suffixes))])
    finally:
        admin.close()
