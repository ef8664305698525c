"""`patchd bench edit | store | ingest | daemon | e2e | scale | chaos`: every benchmark's arguments and printing.

The work is in patching/eval/bench.py (edit) and daemon/tools/ (store, ingest, daemon, e2e, scale, chaos).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from patching.config import ACTIVATIONS, DTYPES

# the size: long enough that start-up and the first group join are noise
INGEST_EVENTS = 20_000
# records per poll = events per database transaction; amortises the commit and the offset commit
INGEST_BATCH = 500
# the count of real FEVER corrections
DAEMON_CORRECTIONS = 200
# events in one store benchmark run: large enough that per-run start-up is noise (the size)
BENCH_EVENTS = 50_000
# one record_batch per Kafka poll; kafka-python's default max_poll_records is 500
BENCH_BATCH = 500
BROKER_HELP = "Kafka bootstrap host:port (default: start a private broker with deploy/kafka/broker.sh)"


def register(sub: Any, bench: Any) -> None:
    p = bench.add_parser(
        "edit",
        help="sequential real edits with the gate: cached trainer vs the reference procedure",
        description="Edit the mistakes of a prepared base one after another, once with the cached "
        "trainer and once with the reference procedure (full forward every step), with the gate "
        "on the held-out set; print a table and optionally write JSON.",
    )
    p.add_argument(
        "--base",
        default="fever-minilm",
        help="prepared base name, local model directory, or config:NAME for a real-size architecture with "
        "RANDOM weights and synthetic edits (llama-3.2-1b, llama-3.1-8b, qwen2.5-7b) (default: fever-minilm)",
    )
    p.add_argument("--edits", type=int, default=50, help="number of sequential edits (default: 50)")
    p.add_argument("--data-dir", type=Path, default=None, help="data directory (default: ../shared/data)")
    p.add_argument("--seed", type=int, default=0, help="split and training seed (default: 0)")
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON to this file")
    p.add_argument("--no-reference", action="store_true", help="skip the reference-mode run")
    p.add_argument(
        "--reference-edits",
        type=int,
        default=None,
        help="edit only the first N mistakes in reference mode (default: all)",
    )
    p.add_argument("--activation", choices=ACTIVATIONS, default=None, help="patch activation")
    p.add_argument(
        "--mining-interval",
        type=int,
        default=None,
        help="hard-negative mining: full M@k every N steps (0 = every step)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="the frozen model's weights (default: auto = bfloat16 on CUDA)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: auto = cuda when there is one)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="train every edit for exactly this many steps, no stop rule (default: the stop rule; config:NAME: 100)",
    )
    p.add_argument(
        "--memory-rows", type=int, default=10_000, help="config:NAME only: rows of the memory M (default: %(default)s)"
    )
    p.set_defaults(func=_bench_edit)

    store = bench.add_parser(
        "store", help="record a synthetic correction stream and print events/s for SQLite and PostgreSQL"
    )
    store.add_argument(
        "--events",
        type=int,
        default=BENCH_EVENTS,
        help="events delivered, 30%% of them redeliveries (default: %(default)s)",
    )
    store.add_argument(
        "--batch-size",
        type=int,
        default=BENCH_BATCH,
        help="events per record_batch transaction (default: %(default)s)",
    )
    store.add_argument(
        "--backends",
        nargs="+",
        choices=["sqlite", "postgresql"],
        default=["sqlite", "postgresql"],
        help="backends to measure (default: both)",
    )
    store.add_argument(
        "--pg-url",
        help="PostgreSQL server to use (a scratch database is created and dropped "
        "there); default: start a private server with Debian's PostgreSQL binaries",
    )
    store.add_argument("--scratch-dir", help="directory for the SQLite file (default: the system temp dir)")
    store.add_argument(
        "--existing",
        type=int,
        default=0,
        metavar="N",
        help="also run on a database that first holds N reports (N/10 mistakes), side by side with the empty one, "
        "and time `patchd status` and the dedupe lookup at that size (the issue's size: 1000000)",
    )
    store.add_argument("--json", type=Path, metavar="FILE", help="also write the results to FILE as JSON")
    store.set_defaults(func=_bench_store)

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
    daemon.add_argument(
        "--dtype", choices=DTYPES, default=None, help="the daemon's [model] dtype for this run (default: its setting)"
    )
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
    e2e.add_argument(
        "--storage",
        default="file",
        help="where versions are published, comma-separated for side-by-side runs: file (a local "
        "directory), s3 (a bucket on a private S3 server from deploy/s3/server.sh) (default: %(default)s)",
    )
    e2e.add_argument(
        "--idle",
        type=float,
        default=60.0,
        help="seconds to count an idle watcher's requests to S3 after the corrections (default: %(default)s)",
    )
    e2e.add_argument(
        "--dtype", choices=DTYPES, default=None, help="the daemon's [model] dtype for this run (default: its setting)"
    )
    e2e.add_argument("--json", type=Path, metavar="FILE", help="also write the result to FILE")
    e2e.set_defaults(func=_e2e)

    scale = bench.add_parser(
        "scale",
        help="a long stream of real edits through the daemon's parts, every cost measured per 1,000 edits",
        description="Edit N real cases one after another the daemon's way (store, worker, engine, gate, "
        "snapshot): FEVER claims for fever-minilm (its mistakes, then label flips), CounterFact rewrites "
        "(target_new) for zsre-smollm2. At the end of every window measure latency, SR, ER, locality, RSS, "
        "inference overhead against the base, version / publish / fetch bytes, downstream load time and the "
        "restart-to-ready time of a real `patchd run`. Ctrl-C or SIGTERM writes a partial report; --resume goes on.",
    )
    scale.add_argument(
        "--base",
        default="fever-minilm",
        choices=["fever-minilm", "zsre-smollm2"],
        help="prepared base (default: %(default)s)",
    )
    scale.add_argument("--edits", type=int, default=10_000, help="edits in the stream (default: %(default)s)")
    scale.add_argument("--window", type=int, default=1000, help="edits per measured window (default: %(default)s)")
    scale.add_argument(
        "--memory-size",
        type=int,
        default=None,
        help="inputs in the memory M (default: 4,000 FEVER claims, leaving 10,000+ to edit; 2,000 CounterFact "
        "neighbourhood prompts)",
    )
    scale.add_argument("--json", type=Path, metavar="FILE", help="the report (default: bench-scale-<base>.json)")
    scale.add_argument("--resume", action="store_true", help="go on with the stopped run of --json FILE")
    scale.add_argument("--no-restart", action="store_true", help="skip the restart measurement (no Kafka broker)")
    scale.add_argument(
        "--remeasure",
        action="store_true",
        help="measure the inference overhead of the finished run of --json FILE again (its model as the daemon "
        "restores it, more alternating rounds), e.g. once the machine is quiet; added to the report as "
        "`remeasured`, the windows are left as they were",
    )
    scale.add_argument("--bootstrap", help=BROKER_HELP)
    scale.add_argument("--data-dir", type=Path, default=None, help="data directory (default: ../shared/data)")
    scale.add_argument("--seed", type=int, default=0, help="split seed (default: %(default)s)")
    scale.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    scale.set_defaults(func=_scale)

    chaos = bench.add_parser(
        "chaos",
        help="the real daemon through broker, database, storage and process faults: recovery times, nothing lost",
        description="Run `patchd run` (a child process) on its own Kafka broker, PostgreSQL server and a "
        "size-limited tmpfs as storage root, with a producer sending a known stream and a downstream watcher "
        "in a child process, through five faults in turn: the broker stopped for --broker-down seconds, "
        "PostgreSQL restarted, the storage root full during a publish, the daemon SIGKILLed every 20-40 s for "
        "--minutes minutes, the watcher SIGKILLed. Each recovery is timed and what was held back and lost is "
        "counted; at the end every event must be stored once or dead-lettered, LATEST must have verified at "
        "every sample, and the model must equal, bit for bit, an uninterrupted run of the same mistakes in "
        "the same order. Needs root for the tmpfs (without it that fault is reported as not run). Ctrl-C or "
        "SIGTERM writes a partial report. Exit 0 when every check passed.",
    )
    chaos.add_argument(
        "--minutes", type=float, default=10.0, help="length of the SIGKILL phase, in minutes (default: %(default)s)"
    )
    chaos.add_argument(
        "--base",
        default="fever-minilm",
        help="a prepared base, whose task's edit-split claims it gets wrong are the corrections, or a local "
        "model directory with --data (default: %(default)s)",
    )
    chaos.add_argument(
        "--data",
        type=Path,
        help='a directory with claims.jsonl (one {"input", "target"} per line: the corrections), memory.jsonl '
        "and heldout.jsonl (the daemon's memory and held-out inputs); needed for a local --base",
    )
    chaos.add_argument("--claims", type=int, help="correct at most this many claims (default: every one found)")
    chaos.add_argument(
        "--broker-down", type=float, default=60.0, help="seconds the broker stays stopped (default: %(default)s)"
    )
    chaos.add_argument(
        "--rate",
        type=float,
        help="events a second (default: the stream spans the planned run; the rest is sent at the end)",
    )
    chaos.add_argument("--seed", type=int, default=0, help="stream order and fault timing seed (default: %(default)s)")
    chaos.add_argument("--json", type=Path, metavar="FILE", help="write the report to FILE (also a partial one)")
    chaos.add_argument(
        "--work", type=Path, help="work directory (default: a temporary one, removed after a run that passed)"
    )
    chaos.add_argument("--keep", action="store_true", help="keep the work directory (logs, records) after a pass")
    chaos.set_defaults(func=_chaos)


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
    from daemon.tools.bench_daemon import run_ingest_bench

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
    from daemon.tools.bench_daemon import run_daemon_bench

    if args.dtype:
        os.environ["PATCHD_MODEL_DTYPE"] = args.dtype  # the daemon's settings read it
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
    from daemon.tools.bench_e2e import run_e2e_bench

    if args.dtype:
        os.environ["PATCHD_MODEL_DTYPE"] = args.dtype  # passed on to the daemon process
    if args.corrections < 1 or args.publish_interval <= 0 or args.poll_interval <= 0:
        print("--corrections, --publish-interval and --poll-interval must be positive", file=sys.stderr)
        return 2
    storages = tuple(s.strip() for s in args.storage.split(",") if s.strip())
    if not storages or set(storages) - {"file", "s3"} or len(set(storages)) != len(storages):
        print(f"--storage {args.storage!r}: expected file, s3 or file,s3", file=sys.stderr)
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
        storages,
        args.idle,
    )
    for medium, m in r["storage"].items():
        print(
            f"e2e on {medium}: {m['served']} of {m['corrections']} corrections served downstream; p50 {m['p50_s']}s, "
            f"p95 {m['p95_s']}s (produce -> publish began p50 {m['to_publish_p50_s']}s, publish -> served p50 "
            f"{m['publish_to_served_p50_s']}s); outcomes {m['outcomes']}"
        )
        size = m["version_with_patches"]
        print(
            f"  a version with {size['patches']} patches: {size['total_bytes'] / 1024:.0f} KiB ({size['bytes']}); "
            f"published in {size['publish_s']}s, loaded downstream in {size['load_latest_s']}s"
        )
        if m.get("idle_watcher"):
            idle = m["idle_watcher"]
            print(f"  an idle watcher sends {idle['per_minute']} requests a minute ({idle['requests']})")
    _write(args.json, r)
    return 0 if all(m["served"] for m in r["storage"].values()) else 1


def _scale(args: argparse.Namespace) -> int:
    from daemon.tools.bench_scale import report_path_default, run_scale_bench

    if args.edits < 1 or args.window < 1 or (args.memory_size is not None and args.memory_size < 1):
        print("--edits, --window and --memory-size must be positive", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    path = args.json or report_path_default(args.base)
    if args.resume and not path.exists():
        print(f"--resume: no report at {path}", file=sys.stderr)
        return 2
    _quiet_logs()
    if args.remeasure:
        from daemon.tools.bench_scale import remeasure_overhead

        if not path.exists():
            print(f"--remeasure: no report at {path}", file=sys.stderr)
            return 2
        remeasured = remeasure_overhead(path)
        print(json.dumps(remeasured, indent=1))
        print(f"wrote {path}")
        return 0
    r = run_scale_bench(
        args.base,
        args.edits,
        path,
        resume=args.resume,
        window=args.window,
        memory_size=args.memory_size,
        data_dir=args.data_dir,
        seed=args.seed,
        bootstrap=args.bootstrap,
        restart=not args.no_restart,
    )
    print(f"wrote {path}" + (" (partial: --resume to go on)" if r.get("partial") else ""))
    return 0


def _chaos(args: argparse.Namespace) -> int:
    # before torch is imported: OpenMP threads that spin would steal the daemon's CPU (2 cores)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from daemon.tools.bench_chaos import Options, print_report, run_chaos

    if args.minutes <= 0 or args.broker_down < 0 or (args.claims is not None and args.claims < 1):
        print("--minutes must be positive, --broker-down >= 0, --claims >= 1", file=sys.stderr)
        return 2
    if args.rate is not None and args.rate <= 0:
        print("--rate must be positive", file=sys.stderr)
        return 2
    if args.data is not None and not (args.data / "claims.jsonl").is_file():
        print(f"--data {args.data}: no claims.jsonl there", file=sys.stderr)
        return 2
    _quiet_logs()
    report = run_chaos(
        Options(
            base=args.base,
            data=args.data,
            minutes=args.minutes,
            broker_down_s=args.broker_down,
            claims=args.claims,
            rate=args.rate,
            seed=args.seed,
            json_path=args.json,
            work=args.work,
            keep=args.keep,
        )
    )
    print_report(report)
    if args.json:
        print(f"wrote {args.json}")
    return 0 if report.get("ok") else 1


def _bench_edit(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import torch

    from daemon.settings import resolve_device
    from patching.bases.load import resolve_dtype
    from patching.config import TrainConfig
    from patching.eval.bench import print_table, run_edit_bench

    if args.steps is not None and args.steps < 1:
        print("--steps must be positive", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.base.startswith("config:"):
        from patching.eval.synthetic import PRESETS, print_report, run_synthetic_bench

        name = args.base.removeprefix("config:")
        if name not in PRESETS:
            print(f"--base {args.base}: known configs are {', '.join(PRESETS)}", file=sys.stderr)
            return 2
        report = run_synthetic_bench(
            name,
            steps=args.steps or 100,
            edits=args.edits,
            memory_rows=args.memory_rows,
            reference_edits=0 if args.no_reference else (args.reference_edits or 3),
            dtype=dtype,
            device=device,
            seed=args.seed,
        )
        print_report(report)
    else:
        train = TrainConfig()
        if args.activation:
            train = replace(train, activation=args.activation)
        if args.mining_interval is not None:
            train = replace(train, mining_interval=args.mining_interval)
        if args.steps is not None:
            train = replace(train, max_steps=args.steps, fixed_steps=True)
        report = run_edit_bench(
            args.base,
            edits=args.edits,
            data_dir=args.data_dir,
            seed=args.seed,
            reference=not args.no_reference,
            reference_edits=args.reference_edits,
            train=train,
            threads=args.threads,
            dtype=dtype,
            device=device,
        )
        print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _bench_store(args: argparse.Namespace) -> int:
    from daemon.tools.bench_store import bench_backends

    if args.events < 1 or args.batch_size < 1:
        print("--events and --batch-size must be positive", file=sys.stderr)
        return 2
    if args.existing < 0:
        print("--existing must be >= 0", file=sys.stderr)
        return 2
    results = bench_backends(
        args.backends, args.events, args.batch_size, args.pg_url, args.scratch_dir, existing=args.existing
    )
    for backend in args.backends:
        r = results[backend]
        print(
            f"{backend:<10} {r['events_per_s']:>10,.0f} events/s  "
            f"({r['events']:,} events in {r['seconds']:.2f} s, "
            f"batch {r['batch_size']}, p50 {r['batch_p50_ms']:.1f} ms, p99 {r['batch_p99_ms']:.1f} ms; "
            f"{r['server']})"
        )
        if "at_size" in r:
            a, f = r["at_size"], r["prefill"]
            print(
                f"{'':<10} {a['events_per_s']:>10,.0f} events/s on {f['reports']:,} existing reports "
                f"({f['mistakes']:,} mistakes): {100 * r['at_size_vs_empty']:.0f}% of empty; patchd status "
                f"{a['status_command_s']:.2f} s (query {a['status_query_ms']:.0f} ms); dedupe lookup "
                f"{a['dedupe_lookup_ms_median']:.2f} ms (p99 {a['dedupe_lookup_ms_p99']:.2f})"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
