"""`patchd kafka stuck | skip | retry`: partitions stopped on a record batch the client cannot decode.

The running daemon stops such a partition only (daemon/quarantine.py) and records it in the
database. These commands write the operator's decision to that record (who, when, why); the
daemon carries it out within a few seconds (or at its next start) and records what it did.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path
from typing import Any

from daemon.cli.common import CONFIG_HELP, missing, settings_and_store


def register(sub: Any, bench: Any) -> None:
    kafka = sub.add_parser(
        "kafka",
        help="stuck partitions: list them, skip their undecodable records, or read them again",
        description="A record batch the Kafka client cannot decode (corrupt bytes, a codec library "
        "missing) stops its partition only; the daemon goes on with the others and waits for you.",
    )
    commands = kafka.add_subparsers(dest="kafka_command", metavar="COMMAND")
    kafka.set_defaults(func=lambda args: missing(kafka))

    stuck = commands.add_parser("stuck", help="stuck partitions: where, since when, the error, pending commands")
    stuck.add_argument("--all", action="store_true", help="also the resolved ones, with what was done")
    stuck.add_argument("--json", action="store_true", help="print JSON instead of lines")
    stuck.add_argument("--config", type=Path, help=CONFIG_HELP)
    stuck.set_defaults(func=_stuck)

    skip = commands.add_parser(
        "skip",
        help="give up the undecodable records at a stuck offset; the daemon moves past them",
        description="The daemon moves past the stuck offset one record at a time until a record "
        "decodes, sends one marker record naming the skipped offsets to the DLQ (reason "
        "undecodable_batch) and commits. --offset must be the stuck offset `patchd kafka stuck` shows.",
    )
    skip.add_argument("--partition", type=int, required=True, help="the stuck partition")
    skip.add_argument("--offset", type=int, required=True, help="the stuck offset (a check: nothing else is skipped)")
    _common(skip)
    skip.set_defaults(func=lambda args: _command(args, "skip"))

    retry = commands.add_parser(
        "retry",
        help="read a stuck partition again (after installing a codec library, fixing the broker)",
    )
    retry.add_argument("--partition", type=int, required=True, help="the stuck partition")
    _common(retry)
    retry.set_defaults(func=lambda args: _command(args, "retry", offset=None))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topic", help="the topic (default: [kafka] topic)")
    parser.add_argument("--by", default=None, help="who decides (default: the login name); recorded")
    parser.add_argument("--reason", help="why; recorded with the command")
    parser.add_argument("--config", type=Path, help=CONFIG_HELP)


def _stuck(args: argparse.Namespace) -> int:
    settings, store = settings_and_store(args)
    with store:
        records = store.stuck_partitions(settings.model.name, open_only=not args.all)
    if args.json:
        print(json.dumps([r.as_dict() for r in records], indent=2))
        return 0
    if not records:
        print("no stuck partitions" if not args.all else "no stuck partitions, ever")
    for r in records:
        state = f"resolved {r.resolved_at:%Y-%m-%d %H:%M:%S}: {r.resolution}" if r.resolved_at else "STUCK"
        asked = f"; {r.command} asked by {r.operator} at {r.commanded_at:%Y-%m-%d %H:%M:%S}" if r.command else ""
        print(f"{r.topic}[{r.partition}] offset {r.offset} since {r.first_seen:%Y-%m-%d %H:%M:%S}: {state}{asked}")
        print(f"    {r.error}")
    return 0


def _command(args: argparse.Namespace, action: str, offset: int | None = -1) -> int:
    from memory.stuck import NoStuckPartition

    settings, store = settings_and_store(args)
    topic = args.topic or settings.kafka.topic
    operator = args.by or getpass.getuser()
    with store:
        try:
            record = store.command_stuck(
                settings.model.name,
                topic,
                args.partition,
                action,
                operator,
                args.reason,
                offset=args.offset if offset == -1 else offset,
            )
        except NoStuckPartition as exc:
            print(f"patchd kafka {action}: {exc}", file=sys.stderr)
            return 1
    print(
        f"{action} of {record.topic}[{record.partition}] at offset {record.offset} recorded for {operator}; "
        "the running daemon carries it out within seconds (or at its next start): see `patchd kafka stuck --all`"
    )
    return 0
