"""`patchd demo`: the quickstart's one-command demo (the work is in daemon/tools/demo.py)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any


def register(sub: Any, bench: Any) -> None:
    from daemon.tools.demo import DEFAULT_CORRECTIONS

    demo = sub.add_parser(
        "demo",
        help="end to end on a fresh state: real FEVER corrections -> Kafka -> `patchd run` -> published versions",
        description="Start a Kafka broker (deploy/kafka/broker.sh, free ports) and `patchd run` on embedded "
        "defaults (SQLite and checkpoints under --state-dir), send corrections of FEVER claims the base gets "
        "wrong from a separate producer (a few recurring, a few malformed), wait until the daemon has handled "
        "and published them, stop both and show what happened: mistakes patched, duplicates absorbed, DLQ "
        "entries, versions, and predictions before/after through the downstream client. Each run starts from "
        "an empty state directory (a previous demo's is deleted). Needs `patchd prepare fever-minilm` first.",
    )
    demo.add_argument(
        "--corrections",
        type=int,
        default=DEFAULT_CORRECTIONS,
        help="distinct wrong claims to correct (default: %(default)s)",
    )
    demo.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="the demo's state: database, checkpoints, broker data, logs (default: $XDG_STATE_HOME/patchd-demo, "
        "i.e. ~/.local/state/patchd-demo); emptied at the start of each run",
    )
    demo.add_argument(
        "--bootstrap",
        metavar="HOST:PORT",
        help="use this running Kafka broker (a new topic per run) instead of starting one",
    )
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from daemon.logs import configure_logging
    from daemon.tools.demo import DemoError, run_demo

    if args.corrections < 1:
        print("--corrections must be positive", file=sys.stderr)
        return 2
    # this process's own log lines (the downstream client's) would interleave with the summary
    configure_logging(os.environ.get("PATCHD_LOG_LEVEL", "WARNING"), json=True, stream=sys.stderr)
    # SIGTERM unwinds like Ctrl-C, so that the daemon and the broker this run started are stopped
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run_demo(args.corrections, args.state_dir, args.bootstrap, out=lambda s: print(s, flush=True))
    except (DemoError, FileNotFoundError) as exc:
        print(f"patchd demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("patchd demo: interrupted; the daemon and the broker it started are stopped", file=sys.stderr)
        return 130
    return 0 if result["ok"] else 1


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt
