"""`patchd review list | approve ID | dismiss ID`: corrections held for an operator.

With `[policy] reporter_probation_s` set (public feedback), a mistake whose winning target no
established reporter sent is held instead of patched (memory/policy.py). These commands show them
and record the operator's verdict; the running daemon picks an approved one up at its next look
at the queue.
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
    review = sub.add_parser(
        "review",
        help="corrections held for review (policy.reporter_probation_s): list, approve, dismiss",
        description="A mistake at quorum whose target only reporters on probation sent is held, not "
        "patched: a crowd of fresh names cannot change the model alone. Approve queues it for the "
        "daemon; dismiss means it is never patched. Both are recorded with your name and reason.",
    )
    commands = review.add_subparsers(dest="review_command", metavar="COMMAND")
    review.set_defaults(func=lambda args: missing(review))

    listing = commands.add_parser("list", help="held mistakes: input, targets with counts, reporters, since when")
    listing.add_argument("--dismissed", action="store_true", help="also the dismissed ones")
    listing.add_argument("--json", action="store_true", help="print JSON instead of lines")
    listing.add_argument("--config", type=Path, help=CONFIG_HELP)
    listing.set_defaults(func=_list)

    for verdict, text in (("approve", "queue it for the daemon to patch"), ("dismiss", "never patch it")):
        command = commands.add_parser(verdict, help=f"{text} (MISTAKE_ID from `patchd review list`)")
        command.add_argument("mistake_id", type=int, metavar="MISTAKE_ID")
        command.add_argument("--by", help="who decides (default: the login name); recorded")
        command.add_argument("--reason", help="why; recorded with the status change")
        command.add_argument("--config", type=Path, help=CONFIG_HELP)
        command.set_defaults(func=lambda args, approve=verdict == "approve": _decide(args, approve))


def _list(args: argparse.Namespace) -> int:
    settings, store = settings_and_store(args)
    with store:
        held = store.held_mistakes(settings.model.name, dismissed=args.dismissed)
    rows = [
        {"id": m.id, "status": str(m.status), "input": m.input, "target": m.target, "targets": m.targets,
         "reporters": m.reporter_count, "reports": m.report_count, "first_seen": m.first_seen.isoformat()}
        for m in held
    ]  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("nothing held for review")
    for row in rows:
        print(f"{row['id']:>6}  {row['status']:<9} target {row['target']!r} by {row['reporters']} reporters "
              f"({row['reports']} reports, first {row['first_seen']}): {row['input']!r}")  # fmt: skip
    return 0


def _decide(args: argparse.Namespace, approve: bool) -> int:
    from memory.review import NotReviewable

    settings, store = settings_and_store(args)
    operator = args.by or getpass.getuser()
    with store:
        try:
            mistake = store.review(settings.model.name, args.mistake_id, approve, operator, args.reason)
        except NotReviewable as exc:
            print(f"patchd review: {exc}", file=sys.stderr)
            return 1
    print(f"mistake {mistake.id} {'approved: queued' if approve else 'dismissed'} by {operator}")
    return 0
