"""`patchd bench ingest` and `patchd bench daemon`: the daemon's throughput and real-edit benchmarks."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

# the size: long enough that start-up and the first group join are noise
INGEST_EVENTS = 20_000
# records per poll = events per database transaction; amortises the commit and the offset commit
INGEST_BATCH = 500
# the count of real FEVER corrections
DAEMON_CORRECTIONS = 200
BROKER_HELP = "Kafka bootstrap host:port (default: start a private broker with deploy/kafka/broker.sh)"


def register(sub: Any, bench: Any) -> None:
    ingest = bench.add_parser(
        "ingest",
        help="events per second from Kafka into the database (30%% redelivered duplicates)",
        description="Produce a synthetic correction stream, then time the daemon's consumer storing it "
        "(decode, validate, one transaction per poll, offset commit).",
    )
    ingest.add_argument(
        "--events", type=int, default=INGEST_EVENTS, help="events delivered (default: %(default)s)"
    )
    ingest.add_argument(
        "--batch", type=int, default=INGEST_BATCH, help="records per poll (default: %(default)s)"
    )
    ingest.add_argument("--bootstrap", help=BROKER_HELP)
    ingest.add_argument("--database", help="database URL (default: a temporary SQLite file)")
    ingest.add_argument("--json", type=Path, metavar="FILE", help="also write the result to FILE")
    ingest.set_defaults(func=_ingest)

    daemon = bench.add_parser(
        "daemon",
        help="real corrections through `patchd run --once`: outcomes and per-edit timings",
        description="Produce corrections of FEVER claims the base gets wrong and run the daemon once over "
        "them; print accepted / rejected / already fixed and per-edit and end-to-end timings.",
    )
    daemon.add_argument(
        "--corrections",
        type=int,
        default=DAEMON_CORRECTIONS,
        help="corrections to produce (default: %(default)s)",
    )
    daemon.add_argument("--base", default="fever-minilm", help="prepared base (default: %(default)s)")
    daemon.add_argument("--bootstrap", help=BROKER_HELP)
    daemon.add_argument("--json", type=Path, metavar="FILE", help="also write the result to FILE")
    daemon.set_defaults(func=_daemon)


def _write(path: Path | None, result: dict[str, Any]) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


def _quiet_logs() -> None:
    from daemon.logs import configure_logging

    # per-batch and per-edit lines would drown the numbers; warnings still show, on stderr
    configure_logging(os.environ.get("PATCHD_LOG_LEVEL", "WARNING"), json=True, stream=sys.stderr)


def _ingest(args: argparse.Namespace) -> int:
    from daemon.bench import run_ingest_bench

    if args.events < 1 or args.batch < 1:
        print("--events and --batch must be positive", file=sys.stderr)
        return 2
    _quiet_logs()
    r = run_ingest_bench(args.events, args.bootstrap, args.batch, args.database)
    print(
        f"ingest: {r['events_per_s']:,.0f} events/s ({r['events']:,} events, {r['duplicates']:,} duplicates, "
        f"{r['mistakes']:,} mistakes in {r['seconds']:.2f}s; batch {r['batch_size']}, {r['database']})"
    )
    _write(args.json, r)
    return 0


def _daemon(args: argparse.Namespace) -> int:
    from daemon.bench import run_daemon_bench

    _quiet_logs()
    r = run_daemon_bench(args.corrections, args.base, args.bootstrap)
    e, t = r["per_edit_ms"], r["per_trained_edit_ms"]
    print(
        f"daemon: {r['corrections']} corrections -> {r['accepted']} accepted, "
        f"{r['rejected']} rejected by the gate, {r['already_fixed']} already fixed, {r['lost']} lost"
    )
    print(
        f"per edit: median {e.get('median')} ms, p95 {e.get('p95')} ms (trained edits: median "
        f"{t.get('median')} ms, p95 {t.get('p95')} ms)"
    )
    print(
        f"end to end: {r['end_to_end_seconds']}s (start-up {r['startup_seconds']}s incl. memory build "
        f"{r['model_setup_seconds']}s; ingest + patching {r['patching_seconds']}s) on {r['device']}"
    )
    _write(args.json, r)
    return 0 if r["lost"] == 0 else 1
