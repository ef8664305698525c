"""The secured broker (`KAFKA_SECURITY=sasl_ssl deploy/kafka/broker.sh`): TLS, SCRAM-SHA-512 and ACLs, really
exercised, with patchd as its `patchd` user.

One broker for the module, started by the script on free ports with a private state directory (it
fails the module, never skips it, when it cannot start). The daemon runs `patchd run --once` as a
child process whose Kafka settings, password included, come only from the environment file the
script wrote; nothing here mocks Kafka.

kafka-python (3.0.12) does not raise an authentication or certificate failure to its caller: it
retries until its bootstrap times out (KafkaTimeoutError). Each refusal is therefore pinned by its
cause: the broker's log line for the attempt ("Failed authentication with ...: invalid
credentials", "SSL handshake failed"), and for a certificate, what kafka-python logs and what a TLS
handshake raises. kafka-python's own SaslAuthenticationFailedError line is not relied on: when the
broker's error response and its close arrive in one read, kafka-python drops the response and logs
only "socket disconnected" (kafka/net/transport.py _sock_recv), more often on a loaded machine.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import random
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import (
    ACLFilter,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    ResourcePatternFilter,
    ResourceType,
)
from kafka.errors import GroupAuthorizationFailedError, KafkaTimeoutError, TopicAuthorizationFailedError

from daemon import cli
from daemon.settings import load_settings
from daemon.tools.broker import BrokerError, BrokerScript, free_ports
from daemon.tools.kafka_acls import grants
from memory.store import Store
from tests.tinybase import LABELS, MODEL, prepare, sentence

pytestmark = pytest.mark.kafka

TOPIC = "corrections"
USERS = ("admin", "patchd", "producer")
# how long a refused client retries before kafka-python gives up (the broker logs the first refusal
# within milliseconds; kafka-python would retry for 30 s by default)
REFUSED_BOOTSTRAP_MS = 2500


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerScript]:
    broker = BrokerScript.on_free_ports(tmp_path_factory.mktemp("kafka-secured"), security="sasl_ssl", topic=TOPIC)
    try:
        broker.start()
    except (BrokerError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"the secured Kafka broker did not start: {exc}", pytrace=False)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def secrets(secured: BrokerScript) -> dict[str, str]:
    """Every secret the broker's state holds: the users' and keystore's passwords, the keys' PEM bodies."""
    found = {name: secured.password(name) for name in (*USERS, "keystore")}
    for key in ("ca.key", "broker.key"):
        body = (secured.state_dir / "tls" / key).read_text().splitlines()[1:-1]
        found[key] = "".join(body)
        found[f"{key} line"] = body[0]  # a key printed as PEM has its lines apart
    return found


def assert_no_secret(text: str, secrets: dict[str, str], where: str) -> None:
    leaked = [name for name, value in secrets.items() if value in text]
    assert not leaked, f"{where} shows {leaked}"


def _admin(secured: BrokerScript) -> KafkaAdminClient:
    return KafkaAdminClient(client_id="patchd-tests", **secured.client_config("admin"))


def _read_all(config: dict[str, Any], topic: str) -> list[Any]:
    """Every record of a one-partition topic, up to its end offset now."""
    consumer = KafkaConsumer(group_id=None, enable_auto_commit=False, **config)
    tp = TopicPartition(topic, 0)
    try:
        end = consumer.end_offsets([tp], timeout_ms=10_000)[tp]
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        records: list[Any] = []
        deadline = time.monotonic() + 30
        while consumer.position(tp) < end and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        assert consumer.position(tp) >= end, f"{topic}: read to {consumer.position(tp)} of {end} in 30 s"
        return records
    finally:
        consumer.close()


class BrokerLog:
    """The lines the broker logged since this object was made (one test at a time uses the broker)."""

    def __init__(self, broker: BrokerScript):
        self.path = broker.state_dir / "broker.log"
        self.start = self.path.stat().st_size

    def new(self) -> str:
        with self.path.open("rb") as fh:
            fh.seek(self.start)
            return fh.read().decode("utf-8", "replace")


def _refused(make_client: Callable[[], Any], caplog: pytest.LogCaptureFixture) -> tuple[BaseException, str]:
    """The error a client got (it must get one) and what kafka-python logged about the attempt."""
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="kafka"):
        with pytest.raises(KafkaTimeoutError) as info:
            client = make_client()
            client.close()
    return info.value, "\n".join(r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------- the script


def test_start_prints_what_a_client_needs_and_keeps_secrets_to_the_owner(
    secured: BrokerScript, secrets: dict[str, str]
) -> None:
    again = secured.run("start")  # idempotent: the running broker, its ACLs applied again
    assert again.returncode == 0, again.stderr
    lines = again.stdout.strip().splitlines()
    assert lines[-1] == secured.bootstrap
    assert f"ca: {secured.ca_file}" in lines and f"patchd environment file: {secured.env_file}" in lines
    assert_no_secret(again.stdout + again.stderr, secrets, "broker.sh start")
    assert_no_secret((secured.state_dir / "broker.log").read_text(), secrets, "the broker's log")
    assert secured.run("status").stdout.startswith("running pid=")

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    state, tls = secured.state_dir, secured.state_dir / "tls"
    private = [tls / "ca.key", tls / "broker.key", tls / "broker.p12", state / "server.properties"]
    private += [state / "secrets" / f"{name}.password" for name in (*USERS, "keystore")]
    private += [secured.env_file, state / "secrets" / "admin.properties"]
    assert {str(p.relative_to(state)): mode(p) for p in private} == {str(p.relative_to(state)): 0o600 for p in private}
    assert mode(state / "secrets") == 0o700 and mode(secured.ca_file) == 0o644
    assert not (state / "format.args").exists()  # the SCRAM passwords' argument file is gone

    # the broker's certificate: for 127.0.0.1 and localhost, a server's, signed by the private CA
    ca = x509.load_pem_x509_certificate(secured.ca_file.read_bytes())
    cert = x509.load_pem_x509_certificate((tls / "broker.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]

    # the ACLs are exactly the table daemon/tools/kafka_acls.py states (deploy/README.md's)
    admin = _admin(secured)
    try:
        everything = ACLFilter(
            principal=None,
            host="*",
            operation=ACLOperation.ANY,
            permission_type=ACLPermissionType.ANY,
            resource_pattern=ResourcePatternFilter(ResourceType.ANY, None, ACLResourcePatternType.ANY),
        )
        acls, _ = admin.describe_acls(everything)
    finally:
        admin.close()
    listed = {
        (
            a.principal.removeprefix("User:"),
            a.operation.name,
            a.resource_pattern.resource_type.name,
            a.resource_pattern.resource_name,
            a.resource_pattern.pattern_type == ACLResourcePatternType.PREFIXED,
        )
        for a in acls
    }
    assert listed == {tuple(g) for g in grants(TOPIC, "patchd-")}
    assert {a.permission_type for a in acls} == {ACLPermissionType.ALLOW}


# ---------------------------------------------------------------------------- the daemon


def _http(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as exc:
        return str(exc.read().decode())


def test_the_daemon_consumes_dead_letters_and_releases_over_sasl_ssl_with_credentials_from_its_environment(
    secured: BrokerScript,
    secrets: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from patching.bases.load import load_base
    from patching.bases.tasks import TaskAdapter

    base, data = prepare(tmp_path / "tiny")
    # corrections asking for the label the base does NOT give: real mistakes, so patches are kept
    # and published (and announced on the releases topic)
    rng = random.Random(23)
    inputs = [sentence(rng, first) for first in (3, 4, 5)]
    predicted = TaskAdapter(load_base(str(base))).predict(inputs)
    events = [
        {"id": f"sec-{i}", "model": MODEL, "input": text, "target": next(x for x in LABELS if x != guess),
         "reporter": "app"}
        for i, (text, guess) in enumerate(zip(inputs, predicted, strict=True))
    ]  # fmt: skip
    producer = KafkaProducer(acks="all", **secured.client_config("producer"))
    try:
        for event in events:
            producer.send(TOPIC, json.dumps(event).encode())
        # not JSON: dead-lettered. The topic's last record: the daemon's commit must reach past it
        broken = producer.send(TOPIC, b'{"id": "broken", "model": "tiny", "input": "w1').get(timeout=30).offset
    finally:
        producer.close()

    # the settings file has no [kafka] section: broker, user, password and CA come from the
    # environment file broker.sh wrote, as systemd's EnvironmentFile= would pass them
    (health_port,) = free_ports(1)
    config = tmp_path / "patchd.toml"
    config.write_text(f"""
device = "cpu"
[model]
name = "{MODEL}"
base = "{base}"
memory_file = "{data / "memory.jsonl"}"
heldout_file = "{data / "heldout.jsonl"}"
[state]
dir = "{tmp_path / "state"}"
[health]
port = {health_port}
""")
    daemon_env = secured.daemon_env()
    assert daemon_env["PATCHD_KAFKA_SASL_PLAIN_PASSWORD"] == secrets["patchd"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PATCHD_KAFKA_")}
    env = {**clean, **daemon_env, "OMP_WAIT_POLICY": "PASSIVE"}
    out, err = tmp_path / "daemon.out", tmp_path / "daemon.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--once", "--config", str(config)],
            stdout=stdout,
            stderr=stderr,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
        )
        scraped: list[str] = []  # /metrics and /readyz, as often as the run lasts
        try:
            while proc.poll() is None:
                try:
                    scraped += [_http(f"http://127.0.0.1:{health_port}{path}") for path in ("/metrics", "/readyz")]
                except (urllib.error.URLError, ConnectionError):
                    pass  # not listening yet, or already stopped
                time.sleep(0.5)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    log = out.read_text() + err.read_text()
    assert rc == 0, log[-3000:]
    assert any("patchd_events_consumed_total" in body for body in scraped), "/metrics was never scraped"

    settings = load_settings(config, env)
    assert settings.kafka.security_protocol == "SASL_SSL" and settings.kafka.group_id == "patchd-tiny"
    # (the other tests of the module write to the same topics: what this one sent is looked for)
    with Store.open(settings.database.url) as store:
        assert {e["id"] for e in events} <= store.event_ids(MODEL)
        versions = store.versions(MODEL)
    assert versions, "no patch was kept, so nothing was published"

    # what the daemon wrote, read back as admin: the dead letter, the release events, the commit
    admin_config = secured.client_config("admin")
    dead = {dict(r.headers)["source_offset"]: r for r in _read_all(admin_config, f"{TOPIC}.dlq")}
    assert dict(dead[str(broken).encode()].headers)["reason"] == b"bad_json"
    released = [json.loads(r.value) for r in _read_all(admin_config, f"{TOPIC}.releases")]
    released = [r for r in released if r.get("manifest_sha256")]  # not another test's stand-in
    assert [r["version"] for r in released] == [v.number for v in versions]
    assert {r["model"] for r in released} == {MODEL}
    admin = _admin(secured)
    try:
        offsets = admin.list_group_offsets("patchd-tiny")["patchd-tiny"]
    finally:
        admin.close()
    assert {tp.partition: om.offset for tp, om in offsets.items()} == {0: broken + 1}

    # no secret in anything the operator sees
    assert_no_secret(log, secrets, "the daemon's log")
    for body in scraped:
        assert_no_secret(body, secrets, "/metrics or /readyz")
    assert_no_secret((tmp_path / "state" / "health.json").read_text(), secrets, "health.json")
    for var, value in daemon_env.items():
        monkeypatch.setenv(var, value)
    for argv in (
        ["status", "--config", str(config)],
        ["config", "check", str(config)],
        ["config", "check", "--json", str(config)],
        ["check", "--config", str(config)],
    ):
        code = cli.main(argv)
        printed = capsys.readouterr()
        assert code == 0, f"patchd {' '.join(argv)}:\n{printed.out}{printed.err}"
        assert_no_secret(printed.out + printed.err, secrets, f"patchd {' '.join(argv[:2])}")
        if argv[:2] == ["config", "check"] and "--json" not in argv:
            assert 'kafka.sasl_plain_password = "***"' in printed.out
            assert 'kafka.security_protocol = "SASL_SSL"' in printed.out
        if argv[0] == "check":
            assert f"ok   kafka: {secured.bootstrap} (topic {TOPIC} exists)" in printed.out


# ---------------------------------------------------------------------------- refusals


def test_a_client_without_credentials_or_with_a_wrong_password_is_refused(
    secured: BrokerScript,
    secrets: dict[str, str],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    def admin(**config: Any) -> Callable[[], KafkaAdminClient]:
        return lambda: KafkaAdminClient(bootstrap_timeout_ms=REFUSED_BOOTSTRAP_MS, request_timeout_ms=5000, **config)

    # a wrong password: SCRAM refuses it, and the broker says so for this very attempt
    wrong = "not-" + secrets["patchd"][:8]
    broker_log = BrokerLog(secured)
    error, logged = _refused(admin(**secured.client_config("patchd", password=wrong)), caplog)
    refusals = broker_log.new()
    assert "Failed authentication with /127.0.0.1" in refusals
    assert "invalid credentials with SASL mechanism SCRAM-SHA-512" in refusals
    assert wrong not in str(error) + logged + refusals

    # an unknown user is refused the same way, telling nothing about which users exist
    broker_log = BrokerLog(secured)
    _refused(admin(**secured.client_config("mallory", password=wrong)), caplog)
    assert "invalid credentials with SASL mechanism SCRAM-SHA-512" in broker_log.new()

    # no credentials at all: TLS without SASL, and plain TCP. The listener answers ApiVersions only
    # until SASL is done, then drops the connection; a plaintext client fails the TLS handshake
    no_sasl = {"bootstrap_servers": secured.bootstrap, "security_protocol": "SSL", "ssl_cafile": str(secured.ca_file)}
    broker_log = BrokerLog(secured)
    _refused(admin(**no_sasl), caplog)
    assert "Unexpected Kafka request of type METADATA during SASL handshake" in broker_log.new()
    broker_log = BrokerLog(secured)
    _refused(admin(bootstrap_servers=secured.bootstrap), caplog)
    refusals = broker_log.new()
    assert "Failed authentication with /127.0.0.1" in refusals and "SSL handshake failed" in refusals

    # nothing is readable without credentials: the corrections hold a record, none comes out
    producer = KafkaProducer(acks="all", **secured.client_config("producer"))
    try:
        producer.send(TOPIC, b'{"id": "unread"}').get(timeout=30)
    finally:
        producer.close()
    consumer = KafkaConsumer(group_id=None, api_version=(4, 1), **no_sasl)
    try:
        consumer.assign([TopicPartition(TOPIC, 0)])
        consumer.seek(TopicPartition(TOPIC, 0), 0)
        assert consumer.poll(timeout_ms=2000) == {}
    finally:
        consumer.close()

    # the operator's view: `patchd check` fails on the broker and shows no password, not even in
    # the kafka-python errors it logs to stderr
    for var, value in secured.daemon_env().items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("PATCHD_KAFKA_SASL_PLAIN_PASSWORD", wrong)
    monkeypatch.setenv("PATCHD_STATE_DIR", str(tmp_path / "state"))
    assert cli.main(["check"]) == 1
    printed = capsys.readouterr()
    assert any(line.startswith(f"FAIL kafka: {secured.bootstrap}") for line in printed.out.splitlines())
    assert wrong not in printed.out + printed.err
    assert_no_secret(printed.out + printed.err, secrets, "patchd check")


def test_the_producer_can_neither_read_releases_nor_write_dead_letters(secured: BrokerScript) -> None:
    # something to read: admin (super user) writes a release event
    admin_producer = KafkaProducer(acks="all", **secured.client_config("admin"))
    try:
        admin_producer.send(f"{TOPIC}.releases", key=b"tiny", value=b'{"model": "tiny"}').get(timeout=30)
    finally:
        admin_producer.close()

    producer = KafkaProducer(acks="all", max_block_ms=10_000, **secured.client_config("producer"))
    try:
        with pytest.raises(TopicAuthorizationFailedError, match=f"{TOPIC}.dlq"):
            producer.send(f"{TOPIC}.dlq", b"forged dead letter").get(timeout=30)
        producer.send(TOPIC, b'{"id": "allowed"}').get(timeout=30)  # what it is there for still works
    finally:
        producer.close()

    releases = TopicPartition(f"{TOPIC}.releases", 0)
    reader = KafkaConsumer(group_id=None, enable_auto_commit=False, **secured.client_config("producer"))
    try:
        with pytest.raises(TopicAuthorizationFailedError, match=f"{TOPIC}.releases"):
            reader.end_offsets([releases], timeout_ms=10_000)
        reader.assign([releases])
        reader.seek(releases, 0)
        assert reader.poll(timeout_ms=2000) == {}
    finally:
        reader.close()
    # nor may it join the daemon's consumer group (patchd-*) to read the corrections
    with pytest.raises(GroupAuthorizationFailedError):
        member = KafkaConsumer(TOPIC, group_id="patchd-tiny", **secured.client_config("producer"))
        try:
            member.poll(timeout_ms=10_000)
        finally:
            member.close()

    # and the daemon's user cannot forge corrections
    daemon_producer = KafkaProducer(acks="all", max_block_ms=10_000, **secured.client_config("patchd"))
    try:
        with pytest.raises(TopicAuthorizationFailedError, match=TOPIC):
            daemon_producer.send(TOPIC, b'{"id": "forged"}').get(timeout=30)
    finally:
        daemon_producer.close()


def _other_ca(path: Path) -> Path:
    """A CA certificate that did not sign the broker's certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "another CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_a_broker_certificate_signed_by_another_ca_is_refused(
    secured: BrokerScript, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = _other_ca(tmp_path / "other-ca.pem")

    def handshake(cafile: Path) -> None:
        context = ssl.create_default_context(cafile=str(cafile))
        with socket.create_connection(("127.0.0.1", secured.port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                pass

    handshake(secured.ca_file)  # the broker's own CA: the handshake completes
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        handshake(other)

    # kafka-python with the right password but the wrong CA never gets as far as SASL
    config = {**secured.client_config("patchd"), "ssl_cafile": str(other)}
    _, logged = _refused(
        lambda: KafkaAdminClient(bootstrap_timeout_ms=REFUSED_BOOTSTRAP_MS, request_timeout_ms=5000, **config),
        caplog,
    )
    assert "CERTIFICATE_VERIFY_FAILED" in logged
