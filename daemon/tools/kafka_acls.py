"""Topics and ACLs of the secured development broker (`KAFKA_SECURITY=sasl_ssl deploy/kafka/broker.sh`).

broker.sh runs this file after the broker answers, as its admin user over SASL_SSL:

    python -I daemon/tools/kafka_acls.py --bootstrap 127.0.0.1:9094 --cafile tls/ca.pem \
        --password-file secrets/admin.password --topic corrections --group-prefix patchd-

It creates `<topic>`, `<topic>.dlq` and `<topic>.releases` (one partition each; nobody else may
create topics) and grants exactly what `GRANTS` lists; both steps are idempotent, so every start
runs them. The broker denies whatever no ACL allows (`allow.everyone.if.no.acl.found=false`).

Run as a file, not as a module (`-I`: no script directory or user site on sys.path), so it imports
nothing of patchd: only the standard library and kafka-python, from whichever Python broker.sh is
given (KAFKA_PYTHON). daemon/tools/broker.py imports `grants` to state the same table in Python.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

# the daemon's user, the producing application's user and the super user (broker.sh makes all three)
DAEMON_USER, PRODUCER_USER, ADMIN_USER = "patchd", "producer", "admin"
MECHANISM = "SCRAM-SHA-512"
# the admin client's wait for a broker that answers but is still loading its metadata
CONNECT_TIMEOUT_S = 60.0


class Grant(NamedTuple):
    """One ALLOW ACL: `user` may do `operation` on a topic or group named `name` (or prefixed by it)."""

    user: str
    operation: str  # READ, WRITE, DESCRIBE (kafka.admin.ACLOperation names)
    resource: str  # TOPIC or GROUP
    name: str
    prefixed: bool = False


def grants(topic: str, group_prefix: str) -> list[Grant]:
    """What each user needs, and nothing more.

    The daemon reads the corrections and its consumer group (patchd-<model>, hence a prefix: one
    grant serves every model) and writes its dead letters and release events. The producer only
    writes corrections. DESCRIBE is implied by READ and WRITE; it is granted anyway so that a
    `describe_acls` listing reads as the deploy/README.md table does.
    """
    read, write = ("READ", "DESCRIBE"), ("WRITE", "DESCRIBE")
    table = [Grant(DAEMON_USER, op, "TOPIC", topic) for op in read]
    table += [Grant(DAEMON_USER, op, "GROUP", group_prefix, prefixed=True) for op in read]
    for name in (f"{topic}.dlq", f"{topic}.releases"):
        table += [Grant(DAEMON_USER, op, "TOPIC", name) for op in write]
    table += [Grant(PRODUCER_USER, op, "TOPIC", topic) for op in write]
    return table


def _acl(grant: Grant) -> Any:
    from kafka.admin import ACL, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePattern, ResourceType

    pattern = ACLResourcePatternType.PREFIXED if grant.prefixed else ACLResourcePatternType.LITERAL
    return ACL(
        principal=f"User:{grant.user}",
        host="*",
        operation=ACLOperation[grant.operation],
        permission_type=ACLPermissionType.ALLOW,
        resource_pattern=ResourcePattern(ResourceType[grant.resource], grant.name, pattern),
    )


def _admin(bootstrap: str, cafile: str, password: str) -> Any:
    """An admin client as the super user; retried while the broker finishes starting."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            return KafkaAdminClient(
                bootstrap_servers=bootstrap,
                client_id="broker.sh",
                security_protocol="SASL_SSL",
                ssl_cafile=cafile,
                sasl_mechanism=MECHANISM,
                sasl_plain_username=ADMIN_USER,
                sasl_plain_password=password,
                request_timeout_ms=10_000,
            )
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def apply(bootstrap: str, cafile: str, password: str, topic: str, group_prefix: str) -> list[Grant]:
    """Create the three topics (if missing) and every grant; returns the grants."""
    from kafka.errors import TopicAlreadyExistsError, for_code

    admin = _admin(bootstrap, cafile, password)
    try:
        names = [topic, f"{topic}.dlq", f"{topic}.releases"]
        created = admin.create_topics(
            {name: {"num_partitions": 1, "replication_factor": 1} for name in names}, raise_errors=False
        )
        for result in created["topics"]:
            error = for_code(result["error_code"])
            if error.errno != 0 and error is not TopicAlreadyExistsError:
                raise error(f"topic {result['name']}: {result.get('error_message')}")
        admin.wait_for_topics(names, timeout_ms=30_000)
        table = grants(topic, group_prefix)
        result = admin.create_acls([_acl(g) for g in table])
        if result["failed"]:
            raise RuntimeError(f"the broker refused {len(result['failed'])} ACLs: {result['failed']}")
        return table
    finally:
        admin.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--cafile", required=True)
    # a file, never an argument: a command line is readable by every local user (/proc/PID/cmdline)
    parser.add_argument("--password-file", type=Path, required=True, help="the admin user's password")
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group-prefix", required=True)
    args = parser.parse_args(argv)
    password = args.password_file.read_text().strip()
    table = apply(args.bootstrap, args.cafile, password, args.topic, args.group_prefix)
    print(f"kafka_acls: topics {args.topic} {args.topic}.dlq {args.topic}.releases; {len(table)} ACLs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
