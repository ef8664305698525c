"""The one local Kafka broker launcher, shared by the tests, the demo and the benchmarks.

`deploy/kafka/broker.sh` is the broker (a real Apache Kafka in KRaft combined mode on 127.0.0.1,
from Maven Central jars); this module starts and stops it on free ports with a private state
directory, and creates topics on it.

    BrokerScript.on_free_ports(state_dir).start()   # the test fixtures (one broker per session)
    with broker(None) as address: ...                # demo / benchmarks: a private broker, stopped after
    create_topics(address, "corrections", extra=(".dlq", ".releases"))

The secured mode (KAFKA_SECURITY=sasl_ssl: TLS from the script's own CA, SCRAM-SHA-512 users, ACLs;
see deploy/kafka/README.md) makes its topics itself and hands out what each user's client needs:

    secured = BrokerScript.on_free_ports(state_dir, security="sasl_ssl"); secured.start()
    KafkaProducer(**secured.client_config("producer"))   # kafka-python keyword arguments
    secured.daemon_env()                                 # patchd's PATCHD_KAFKA_* environment
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
    """One broker instance as deploy/kafka/broker.sh sees it: its ports, state directory and mode."""

    port: int
    controller_port: int
    state_dir: Path
    # "sasl_ssl": the secured mode; its files live in the state directory (deploy/kafka/README.md)
    security: Literal["plaintext", "sasl_ssl"] = "plaintext"
    # sasl_ssl: the topic broker.sh creates (with .dlq and .releases) and names in its ACLs
    topic: str = "corrections"

    @classmethod
    def on_free_ports(
        cls, state_dir: Path, *, security: Literal["plaintext", "sasl_ssl"] = "plaintext", topic: str = "corrections"
    ) -> BrokerScript:
        port, controller_port = free_ports(2)
        return cls(port=port, controller_port=controller_port, state_dir=state_dir, security=security, topic=topic)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            # always explicit: a KAFKA_SECURITY exported in the caller's shell must not change the mode
            KAFKA_SECURITY=self.security,
            KAFKA_PORT=str(self.port),
            KAFKA_CONTROLLER_PORT=str(self.controller_port),
            KAFKA_STATE_DIR=str(self.state_dir),
        )
        if self.security == "sasl_ssl":
            # the topics and ACLs are made with kafka-python: the Python running this has it
            env.update(KAFKA_TOPIC=self.topic, KAFKA_PYTHON=sys.executable)
        return env

    # ------------------------------------------------------------------ the secured mode's files

    @property
    def ca_file(self) -> Path:
        """The private CA's certificate: what a client trusts (sasl_ssl)."""
        return self.state_dir / "tls" / "ca.pem"

    @property
    def env_file(self) -> Path:
        """patchd's environment file for this broker, as user patchd (sasl_ssl, mode 0600)."""
        return self.state_dir / "secrets" / "patchd.env"

    def password(self, user: str) -> str:
        """A SCRAM user's password (admin, patchd, producer), or "keystore" for the broker's keystore."""
        return (self.state_dir / "secrets" / f"{user}.password").read_text().strip()

    def client_config(self, user: str, password: str | None = None) -> dict[str, Any]:
        """kafka-python keyword arguments for `user` on the secured broker (`password`: another one)."""
        if self.security != "sasl_ssl":
            return {"bootstrap_servers": self.bootstrap}
        return {
            "bootstrap_servers": self.bootstrap,
            "security_protocol": "SASL_SSL",
            "ssl_cafile": str(self.ca_file),
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": user,
            "sasl_plain_password": self.password(user) if password is None else password,
        }

    def daemon_env(self) -> dict[str, str]:
        """The PATCHD_KAFKA_* variables of env_file, as systemd's EnvironmentFile= would read them."""
        lines = self.env_file.read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))

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
