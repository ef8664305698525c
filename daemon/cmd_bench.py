"""`patchd bench ingest | daemon | e2e`: the daemon's throughput, real-edit and end-to-end benchmarks."""

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
    ingest.add_argument("--events", type=int, default=INGEST_EVENTS, help="events delivered (default: %(default)s)")
    ingest.add_argument("--batch", type=int, default=INGEST_BATCH, help="records per poll (default: %(default)s)")
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

    e2e = bench.add_parser(
        "e2e",
        help="correction produced -> fixed prediction served by a downstream watcher (p50/p95)",
        description="Run `patchd run` as a child process and a CheckpointWatcher here; send real FEVER "
        "corrections one at a time and time each until the watcher serves the corrected label. Also the "
        "size of a version with --version-patches patches.",
    )
    e2e.add_argument("--corrections", type=int, default=100, help="timed corrections (default: %(default)s)")
    e2e.add_argument("--base", default="fever-minilm", help="prepared base (default: %(default)s)")
    e2e.add_argument("--bootstrap", help=BROKER_HELP)
    e2e.add_argument(
        "--publish-interval", type=float, default=5.0, help="the daemon's publish.interval_s (default: %(default)s)"
    )
    e2e.add_argument("--poll-interval", type=float, default=0.5, help="the watcher's poll (default: %(default)s)")
    e2e.add_argument(
        "--gap",
        type=float,
        help="seconds between a fix served and the next correction "
        "(default: the publish interval, so every correction meets an idle publisher)",
    )
    e2e.add_argument("--listen", action="store_true", help="the watcher also listens to <topic>.releases")
    e2e.add_argument("--version-patches", type=int, default=1000, help="patches in the size measurement")
    e2e.add_argument("--json", type=Path, metavar="FILE", help="also write the result to FILE")
    e2e.set_defaults(func=_e2e)


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


def _e2e(args: argparse.Namespace) -> int:
    from daemon.bench_e2e import run_e2e_bench

    if args.corrections < 1 or args.publish_interval <= 0 or args.poll_interval <= 0:
        print("--corrections, --publish-interval and --poll-interval must be positive", file=sys.stderr)
        return 2
    _quiet_logs()
    r = run_e2e_bench(
        args.corrections,
        args.base,
        args.bootstrap,
        args.publish_interval,
        args.poll_interval,
        args.gap,
        args.listen,
        args.version_patches,
    )
    print(
        f"e2e: {r['served']} of {r['corrections']} corrections served downstream; p50 {r['p50_s']}s, "
        f"p95 {r['p95_s']}s (produce -> publish began p50 {r['to_publish_p50_s']}s, publish -> served p50 "
        f"{r['publish_to_served_p50_s']}s); outcomes {r['outcomes']}"
    )
    size = r["version_with_patches"]
    print(
        f"a version with {size['patches']} patches: {size['total_bytes'] / 1024:.0f} KiB ({size['bytes']}); "
        f"published in {size['publish_s']}s, loaded downstream in {size['load_latest_s']}s"
    )
    _write(args.json, r)
    return 0 if r["served"] else 1
