"""`patchd run | status | check | replay`: the service and the operator's view of it.

Handlers import torch, kafka and SQLAlchemy lazily, so `patchd --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.cli.common import CONFIG_HELP

if TYPE_CHECKING:  # imported by the handlers when they run: `patchd --help` stays fast
    from daemon.settings import Settings
    from memory.store import Store

# broker probe in `patchd check`: long enough for a TLS handshake, short enough for a probe
CHECK_KAFKA_TIMEOUT_MS = 5000


def register(sub: Any, bench: Any) -> None:
    run = sub.add_parser(
        "run",
        help="run the daemon: Kafka corrections in, patches out",
        description="Consume correction events, deduplicate them into mistakes and patch them one by "
        "one with the gate. The first SIGTERM/SIGINT stops warm (the current neuron is finished and "
        "committed), a second one at once.",
    )
    run.add_argument("--config", type=Path, help=CONFIG_HELP)
    run.add_argument(
        "--once",
        action="store_true",
        help="drain the topic and the queue, then exit (the daemon's code path; tests, cron)",
    )
    run.set_defaults(func=_run)

    status = sub.add_parser("status", help="reports, dead letters, mistakes by status, patches, backlog")
    status.add_argument("--config", type=Path, help=CONFIG_HELP)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=_status)

    check = sub.add_parser("check", help="health check: exit 0 when healthy, 1 when not")
    check.add_argument("--config", type=Path, help=CONFIG_HELP)
    check.add_argument(
        "--require-daemon",
        action="store_true",
        help="also fail when no daemon is running (default: check a running one if any)",
    )
    check.set_defaults(func=_check)

    replay = sub.add_parser("replay", help="re-queue mistakes whose patching failed")
    replay.add_argument("--config", type=Path, help=CONFIG_HELP)
    replay.add_argument(
        "--from-db",
        action="store_true",
        required=True,
        help="take the mistakes from the database (status failed)",
    )
    replay.add_argument(
        "--include-rejected",
        action="store_true",
        help="also re-queue mistakes the gate rejected (e.g. after loosening the gate)",
    )
    replay.set_defaults(func=_replay)


def _settings(args: argparse.Namespace, logs_to_stdout: bool = False) -> Settings:
    from daemon.logs import configure_logging
    from daemon.settings import load_settings

    settings = load_settings(args.config, os.environ)
    # the daemon's log is its output (journald reads stdout); other commands print results there
    configure_logging(settings.log.level, settings.log.json, stream=None if logs_to_stdout else sys.stderr)
    return settings


def _run(args: argparse.Namespace) -> int:
    from daemon.model import ModelSetupError
    from daemon.settings import SettingsError

    try:
        settings = _settings(args, logs_to_stdout=True)
        from daemon.service import Service

        return Service(settings, once=args.once).run()
    except (SettingsError, ModelSetupError, FileNotFoundError) as exc:
        print(f"patchd run: {exc}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - logged whole, exit 1: systemd restarts us (never an abort)
        from daemon.logs import get_logger

        get_logger("daemon.run").exception("patchd run failed")
        return 1


# ---------------------------------------------------------------------------- status


def _open_store(settings: Settings) -> Store:
    from memory.store import Store

    return Store.open(settings.database.url, upgrade=False)


def _status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        store = _open_store(settings)
    except Exception as exc:  # noqa: BLE001 - any reason the database is unusable is the answer
        print(f"patchd status: cannot open the database: {exc}", file=sys.stderr)
        return 1
    with store:
        report = store.status_summary(settings.model.name, settings.policy.quorum).as_dict()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    rows = [
        ("model", report["model"]),
        ("reports", report["reports"]),
        ("dead-lettered (rejected)", report["rejected"]),
    ]
    rows += [(f"mistakes {k}" + (" for review" if k == "held" else ""), v) for k, v in report["mistakes"].items() if v]
    rows += [
        ("patches kept", report["patches"]),
        ("patch tries", report["patch_tries"]),
        ("backlog", report["backlog"]),
        ("last version", report["last_version"] or "-"),
    ]
    for stuck in report["stuck_partitions"]:
        asked = f"; {stuck['command']} asked by {stuck['operator']}, pending" if stuck["command"] else ""
        rows.append((
            f"STUCK {stuck['topic']}[{stuck['partition']}]",
            f"at offset {stuck['offset']} since {stuck['first_seen']}: {stuck['error'][:160]}{asked} "
            f"(patchd kafka skip|retry --partition {stuck['partition']})",
        ))  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


# ---------------------------------------------------------------------------- check


def _check(args: argparse.Namespace) -> int:
    results: list[tuple[bool, str, str]] = []
    try:
        settings = _settings(args)
    except Exception as exc:  # noqa: BLE001
        print(f"FAIL settings: {exc}")
        return 1
    results.append((True, "settings", str(args.config or "defaults + environment")))
    results.append(_check_database(settings))
    results.append(_check_kafka(settings))
    results.extend(_check_daemon(settings, args.require_daemon))
    for ok, name, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    return 0 if all(ok for ok, _, _ in results) else 1


def _check_database(settings: Settings) -> tuple[bool, str, str]:
    from daemon.settings import mask_url

    try:
        with _open_store(settings) as store:
            counts = store.status_counts(settings.model.name)
    except Exception as exc:  # noqa: BLE001
        return False, "database", f"{mask_url(settings.database.url)}: {exc}"
    return True, "database", f"{mask_url(settings.database.url)} ({sum(counts.values())} mistakes)"


def _check_kafka(settings: Settings) -> tuple[bool, str, str]:
    from kafka import KafkaAdminClient

    try:
        admin = KafkaAdminClient(
            request_timeout_ms=CHECK_KAFKA_TIMEOUT_MS,
            bootstrap_timeout_ms=CHECK_KAFKA_TIMEOUT_MS,
            **settings.kafka.client_config(),
        )
        try:
            topics = set(admin.list_topics())
        finally:
            admin.close()
    except Exception as exc:  # noqa: BLE001
        return False, "kafka", f"{','.join(settings.kafka.bootstrap_servers)}: {exc!r}"
    found = "exists" if settings.kafka.topic in topics else "not created yet"
    return (
        True,
        "kafka",
        f"{','.join(settings.kafka.bootstrap_servers)} (topic {settings.kafka.topic} {found})",
    )


def _check_daemon(settings: Settings, required: bool) -> list[tuple[bool, str, str]]:
    from daemon.scheduler import HEALTH_INTERVAL_S, HEALTH_STALE_INTERVALS, health_path, read_health

    health = read_health(health_path(settings))
    running = bool(health and health.get("state") == "running" and _alive(int(health.get("pid", 0))))
    if not running:
        return [(not required, "daemon", "not running")]
    assert health is not None
    age = time.time() - float(health.get("written_at", 0))
    results = [
        (
            age < HEALTH_STALE_INTERVALS * HEALTH_INTERVAL_S,
            "daemon",
            f"pid {health['pid']}, snapshot {age:.0f}s old",
        ),
        (bool(health.get("worker_alive")), "worker", "alive" if health.get("worker_alive") else "dead"),
        (
            not health.get("replay_mismatches"),
            "rebuild",
            f"{health.get('replayed', 0)} patches replayed, {health.get('replay_mismatches', 0)} gate mismatches",
        ),
    ]
    return results


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


# ---------------------------------------------------------------------------- replay


def _replay(args: argparse.Namespace) -> int:
    from memory.lifecycle import Status

    settings = _settings(args)
    wanted = [Status.FAILED] + ([Status.GATE_REJECTED] if args.include_rejected else [])
    with _open_store(settings) as store:
        ids = store.requeue(settings.model.name, wanted, note="re-queued by patchd replay --from-db")
    print(f"re-queued {len(ids)} mistake(s) ({', '.join(map(str, wanted))}); a running daemon picks them up")
    return 0
