"""A synthetic correction stream with known answers, and the store throughput benchmark.

The stream mimics what the consumer hands to `Store.record_batch` after a few restarts: a
share of deliveries are redeliveries of earlier events (same event id, at-least-once Kafka), and
a share of the distinct events report an input that was reported before (a recurring mistake),
spelled with different whitespace so that only normalisation makes them equal. `Expected` holds
the exact counts a correct store must end with; the idempotency test and the benchmark both
check them.
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from memory.fingerprint import fingerprint, input_key, normalise_input
from memory.records import ReportIn

# a Kafka consumer's default max_poll_records, so one poll becomes one transaction
DEFAULT_BATCH = 500
# reporters in the synthetic population; enough that distinct-reporter counts vary
REPORTERS = 200
TARGETS = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")


@dataclass
class Expected:
    reports: int = 0
    mistakes: int = 0
    report_counts: dict[str, int] = field(default_factory=dict)  # fingerprint -> reports
    targets: dict[str, Counter[str]] = field(default_factory=dict)  # fingerprint -> target counts
    reporters: dict[str, set[str]] = field(default_factory=dict)  # fingerprint -> distinct reporters


@dataclass
class SyntheticStream:
    deliveries: list[ReportIn]
    expected: Expected

    def batches(self, size: int) -> list[list[ReportIn]]:
        return [self.deliveries[i : i + size] for i in range(0, len(self.deliveries), size)]


def synthetic_stream(
    n_deliveries: int,
    duplicate_share: float = 0.3,
    recurring_share: float = 0.2,
    model: str = "bench",
    seed: int = 0,
    prefix: str = "ev",
) -> SyntheticStream:
    """`n_deliveries` events: `duplicate_share` are redeliveries, `recurring_share` of the rest recur."""
    rng = random.Random(seed)
    n_duplicates = round(n_deliveries * duplicate_share)
    n_unique = n_deliveries - n_duplicates
    n_recurring = round(n_unique * recurring_share)
    recurring_at = set(rng.sample(range(1, n_unique), n_recurring)) if n_unique > 1 else set()

    inputs: list[str] = []
    unique: list[ReportIn] = []
    counts: dict[str, int] = defaultdict(int)
    targets: dict[str, Counter[str]] = defaultdict(Counter)
    reporters: dict[str, set[str]] = defaultdict(set)
    for i in range(n_unique):
        if i in recurring_at:
            base = rng.choice(inputs)
            text = "  " + base.replace(" ", " \t ") + "\n"  # same after whitespace collapsing
        else:
            base = f"claim {i} of {prefix}: the synthetic fact number {rng.randrange(10**9)} is true"
            inputs.append(base)
            text = base
        reporter = None if rng.random() < 0.05 else f"user-{rng.randrange(REPORTERS)}"
        target = TARGETS[0] if rng.random() < 0.8 else rng.choice(TARGETS)
        report = _report(model, f"{prefix}-{i:08d}", text, target, reporter, offset=i)
        unique.append(report)
        counts[report.fingerprint] += 1
        targets[report.fingerprint][target] += 1
        reporters[report.fingerprint].add(reporter or "")

    # a redelivery lands at a random point after its original: (position, tie-break, report)
    slots = [(float(i), 0, r) for i, r in enumerate(unique)]
    for k in range(n_duplicates):
        original = rng.randrange(n_unique)
        slots.append((rng.uniform(original, n_unique), k + 1, unique[original]))
    deliveries = [report for _, _, report in sorted(slots, key=lambda slot: slot[:2])]
    expected = Expected(
        reports=n_unique,
        mistakes=len(counts),
        report_counts=dict(counts),
        targets=dict(targets),
        reporters=dict(reporters),
    )
    return SyntheticStream(deliveries=deliveries, expected=expected)


def _report(model: str, event_id: str, text: str, target: str, reporter: str | None, offset: int) -> ReportIn:
    normalised = normalise_input(text)
    raw = f'{{"id": "{event_id}", "model": "{model}", "target": "{target}"}}'.encode()
    return ReportIn(
        event_id=event_id,
        model=model,
        fingerprint=fingerprint(model, text),
        input_text=input_key(normalised),
        target=target,
        raw=raw,
        topic="corrections",
        partition=offset % 3,
        offset=offset,
        reporter=reporter,
    )


def run_store_bench(
    url: str, n_events: int, batch_size: int = DEFAULT_BATCH, seed: int = 0, prefix: str = "ev"
) -> dict[str, Any]:
    """Record a synthetic stream into the database at `url` (fresh, or prefilled: the counts are
    checked as differences); return timings and checks."""
    from memory.store import Store  # here, so that importing the stream generator stays light

    stream = synthetic_stream(n_events, seed=seed, prefix=prefix)
    batches = stream.batches(batch_size)
    with Store.open(url) as store:
        before = store.table_counts()
        latencies: list[float] = []
        start = time.perf_counter()
        for batch in batches:
            t0 = time.perf_counter()
            store.record_batch(batch)
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        counts = store.table_counts()
    added = {k: counts[k] - before.get(k, 0) for k in ("reports", "mistakes")}
    if added["reports"] != stream.expected.reports or added["mistakes"] != stream.expected.mistakes:
        raise AssertionError(
            f"the store gained {added}, not the expected {stream.expected.reports} reports / "
            f"{stream.expected.mistakes} mistakes"
        )
    latencies.sort()
    return {
        "events": len(stream.deliveries),
        "new_reports": stream.expected.reports,
        "mistakes": stream.expected.mistakes,
        "batch_size": batch_size,
        "seconds": round(elapsed, 3),
        "events_per_s": round(len(stream.deliveries) / elapsed, 1),
        "batch_p50_ms": round(_quantile(latencies, 0.5) * 1000, 2),
        "batch_p99_ms": round(_quantile(latencies, 0.99) * 1000, 2),
    }


def prefill(
    url: str, reports: int, per_mistake: int = 10, batch_size: int = 5000, model: str = "bench"
) -> dict[str, Any]:
    """`reports` reports of `reports / per_mistake` distinct mistakes, each reported by
    `per_mistake` different reporters, spread over the stream as a busy year would spread them."""
    from memory.store import Store

    mistakes = max(1, reports // per_mistake)
    t0 = time.perf_counter()
    with Store.open(url) as store:
        for start in range(0, reports, batch_size):
            batch = []
            for i in range(start, min(reports, start + batch_size)):
                m, round_ = i % mistakes, i // mistakes
                text = f"prefilled claim {m}: an earlier year's mistake number {m * 7919 % 1000003}"
                target = TARGETS[0] if m % 10 else TARGETS[1]
                batch.append(_report(model, f"pre-{i:09d}", text, target, f"user-{round_}-{m % 97}", offset=i))
            store.record_batch(batch)
        counts = store.table_counts()
    return {"reports": counts["reports"], "mistakes": counts["mistakes"], "seconds": round(time.perf_counter() - t0, 1)}


def measure_queries(url: str, model: str = "bench", lookups: int = 500) -> dict[str, Any]:
    """What grows with the table: `patchd status` (the query, and the whole command in a fresh
    process) and the dedupe lookup of one input's mistake by fingerprint."""
    import os
    import random
    import statistics
    import subprocess
    import sys
    import tempfile

    from memory.store import Store

    with Store.open(url) as store:
        status_s = []
        for _ in range(5):
            t0 = time.perf_counter()
            store.status_summary(model, 1)
            status_s.append(time.perf_counter() - t0)
        rng = random.Random(1)
        lookup_s = []
        for _ in range(lookups):
            m = rng.randrange(10**5)
            text = f"prefilled claim {m}: an earlier year's mistake number {m * 7919 % 1000003}"
            fp = fingerprint(model, text)
            t0 = time.perf_counter()
            store.find_mistake(model, fp)
            lookup_s.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory(prefix="patchd-bench-status-") as state:
        env = {
            **os.environ,
            "PATCHD_DATABASE_URL": url,
            "PATCHD_MODEL_NAME": model,
            "PATCHD_MODEL_BASE": "fever-minilm",
            "PATCHD_STATE_DIR": state,
        }
        cli_s = []
        for _ in range(3):
            t0 = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "daemon", "status", "--json"], env=env, capture_output=True, timeout=300
            )
            cli_s.append(time.perf_counter() - t0)
            if done.returncode != 0:
                raise RuntimeError(f"patchd status failed: {done.stderr.decode()[-500:]}")
    return {
        "status_query_ms": round(statistics.median(status_s) * 1000, 1),
        "status_command_s": round(statistics.median(cli_s), 2),
        "dedupe_lookup_ms_median": round(statistics.median(lookup_s) * 1000, 3),
        "dedupe_lookup_ms_p99": round(_quantile(sorted(lookup_s), 0.99) * 1000, 3),
    }


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] if sorted_values else 0.0


def bench_backends(
    backends: Sequence[str],
    n_events: int,
    batch_size: int = DEFAULT_BATCH,
    pg_url: str | None = None,
    scratch_dir: str | None = None,
    existing: int = 0,
) -> dict[str, Any]:
    """Run the store benchmark on each backend, each on a fresh, empty database; with `existing`,
    also on one that first holds that many reports (a tenth as many mistakes), side by side, with
    the `patchd status` and dedupe lookup times at that size.

    SQLite: a file in a temporary directory (under `scratch_dir` when given: put it on the disk
    the state directory uses). PostgreSQL: a scratch database created on `pg_url`'s server and
    dropped afterwards, or, without a URL, the same private server the tests use, with
    PostgreSQL's durable defaults (fsync and synchronous_commit on).
    """
    import os
    import platform
    import sqlite3
    import tempfile

    results: dict[str, Any] = {}
    for backend in backends:
        if backend == "sqlite":
            with tempfile.TemporaryDirectory(prefix="patchd-bench-", dir=scratch_dir) as tmp:
                results["sqlite"] = _run(f"sqlite+pysqlite:///{tmp}/bench.db", n_events, batch_size, existing)
                if existing:
                    results["sqlite"]["database_mb"] = round(os.path.getsize(f"{tmp}/bench.db") / 2**20, 1)
            results["sqlite"]["server"] = f"SQLite {sqlite3.sqlite_version} (WAL, synchronous=FULL)"
        elif backend == "postgresql":
            results["postgresql"] = _bench_postgres(pg_url, n_events, batch_size, existing)
        else:
            raise ValueError(f"unknown backend {backend!r}; expected sqlite or postgresql")
    results["machine"] = {
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),  # other work on a shared machine skews wall time
        "python": platform.python_version(),
    }
    return results


def _run(url: str, n_events: int, batch_size: int, existing: int) -> dict[str, Any]:
    """The stream on the empty database; with `existing`, then the prefill and the same-sized
    stream again (new events) on top of it, and the queries at that size."""
    result = run_store_bench(url, n_events, batch_size)
    if not existing:
        return result
    filled = prefill(url, existing)
    at_size = run_store_bench(url, n_events, batch_size, seed=1, prefix="late")
    return {
        **result,
        "prefill": filled,
        "at_size": {**at_size, **measure_queries(url)},
        "at_size_vs_empty": round(at_size["events_per_s"] / result["events_per_s"], 3),
    }


def _bench_postgres(pg_url: str | None, n_events: int, batch_size: int, existing: int = 0) -> dict[str, Any]:
    from sqlalchemy import create_engine, make_url, text

    from daemon.tools.pgserver import PostgresServer

    server = None
    if pg_url is None:
        server = PostgresServer(durable=True)
        pg_url = server.start()
    name = f"patchd_bench_{int(time.time())}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            version = conn.scalar(text("SHOW server_version"))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            url = make_url(pg_url).set(database=name).render_as_string(hide_password=False)
            result = _run(url, n_events, batch_size, existing)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        where = "private server, durable defaults" if server else "server at the given URL"
        result["server"] = f"PostgreSQL {version} ({where})"
        return result
    finally:
        admin.dispose()
        if server is not None:
            server.stop()
