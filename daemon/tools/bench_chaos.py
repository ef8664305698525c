"""`patchd bench chaos`: the real daemon through real faults, each recovery measured, nothing lost.

Every part runs as it is deployed, each in its own process, on services of the bench's own:

    a Kafka broker     deploy/kafka/broker.sh on free ports (daemon/tools/broker.py): stopped and restarted
    PostgreSQL         a private cluster (daemon/tools/pgserver.py): restarted under the daemon
    patchd run         `python -m daemon run --config FILE`, never --once; the bench plays systemd
                       (Restart=on-failure): a daemon that exits non-zero or is killed is started again
                       after RESTART_DELAY_S, with the same settings, as the unit's restart would
    storage            the publish root on a size-limited tmpfs the bench mounts (root only): filled up
    a downstream       a CheckpointWatcher in a child process (`python -m daemon.tools.bench_chaos
    service            watcher ...`) that records every version it loads or refuses: killed and restarted
    a producer         a thread sending a known stream at a steady rate: corrections of claims the base
                       gets wrong, recurring reports of them by other users, a few malformed events

The faults, in sequence, each while the stream flows:

    1. the broker stopped for --broker-down seconds, then started again (same state, same ports)
    2. PostgreSQL restarted (pg_ctl restart -m fast) right after the daemon stored a batch or a verdict
    3. the storage root full during a publish: filled until ENOSPC, the bench waits for the daemon's
       failed publish (it must stay alive, LATEST on the previous complete version), frees the
       space and times the next publish
    4. the daemon SIGKILLed every 20-40 s for --minutes minutes, right after a progress line
    5. the downstream watcher SIGKILLed and started again

Recovery is measured from the fault's end until the daemon answers /readyz 200 and the store holds
everything sent before the end (and stays so for a settling while: a daemon that notices the fault
late and restarts then has not recovered yet). `held_back` is what was sent but not stored at the
fault's end, `peak_lag` the most that was ever waiting during the fault, `lost` what was sent
before the end and never stored (must be 0).

At the end the rest of the stream is sent, everything drains, and the bench checks: every valid
event stored exactly once and every malformed one dead-lettered (DLQ deduplicated by source
offset: delivery is at least once) and in the rejected table once; no mistake left open; at most
one kept patch per mistake; LATEST verified at every sample and every version the watcher loaded;
the published version's neurons equal the stored patches; and the model equals, bit for bit, an
uninterrupted run of the same stream. "The same stream" is the same mistakes in the same
processing order (arrival timing decides which mistake the worker takes first): the store's
verdicts, in the order they were stored, are re-run in this process on a fresh PatchedModel with
the daemon's settings, and every verdict and every kept neuron must come out identical.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.tools.bench_daemon import machine_facts
from daemon.tools.broker import BrokerScript, create_topics, free_ports
from daemon.tools.interrupt import interruptible
from daemon.tools.pgserver import PostgresServer

if TYPE_CHECKING:
    from daemon.settings import Settings
    from memory.store import Store
    from patching.storage import FileStorage

ROOT = Path(__file__).resolve().parents[2]
# the figures: the broker away for a minute, a kill every 20-40 s for ten minutes
BROKER_DOWN_S = 60.0
KILL_EVERY_S = (20.0, 40.0)
MINUTES = 10.0
# systemd's unit restarts after RestartSec=10; the bench restarts at once (1 s) so that the figures
# are the daemon's own recovery, not a configured wait (add RestartSec to them for the service)
RESTART_DELAY_S = 1.0
# the first start of a real base on a CPU builds its memory set M (minutes for fever-minilm)
READY_TIMEOUT_S = 900.0
# a fault not recovered from by then is reported as not recovered (recovery_s null), and what is
# still missing then as lost
RECOVERY_TIMEOUT_S = 300.0
# a recovered daemon must stay ready this long before the recovery counts: one that notices a
# fault late (a broken connection found at its next use) and restarts then has not recovered
SETTLE_S = 5.0
# after a PostgreSQL restart the daemon checks its model lock's session within LOCK_CHECK_S (30 s,
# daemon/service.py) and exits when it is gone: recovery counts only once that check has passed
PG_SETTLE_S = 40.0
# pause between a recovery and the next fault: the daemon is in steady state when a fault starts
STEADY_S = 5.0
# warm-up: this many events stored before the first fault (the stream is flowing)
WARMUP_EVENTS = 10
# how long the bench waits for the daemon to try (and fail) a publish on the full storage
PUBLISH_FAIL_TIMEOUT_S = 180.0
# the storage root's tmpfs: far more than a run publishes (a version is kilobytes), small enough to fill at once
TMPFS_MB = 64
# LATEST is read and verified this often; the lag and readiness are sampled this often too
SAMPLE_S = 1.0
# the bench's own checks of readiness and stored events while it waits for a recovery
POLL_S = 0.25
# everything sent, stored, patched and published after the last fault
DRAIN_TIMEOUT_S = 900.0
# the downstream watcher's poll of LATEST
WATCH_INTERVAL_S = 0.5
# a kill waits at most this long for a progress line, so that it lands in the middle of work
KILL_AIM_S = 5.0
# log lines that say the daemon is doing something (a kill right after one lands mid-work)
PROGRESS = ("batch stored", "mistake done", "version published")
PUBLISH_FAILED = "publish failed; the next run retries"
# recurring reports: one claim in RECUR_EVERY is reported again by one or two other users
RECUR_EVERY = 4
# malformed events per reason
MALFORMED_EACH = 3
# statuses no mistake may be left in once everything drained
OPEN_AFTER_DRAIN = ("queued", "patching", "reported", "failed")
# PATCHD_* variables that reach the daemon: only where caches live; every setting is in its config file
PASSED_ENV = ("PATCHD_CACHE_DIR",)


# ---------------------------------------------------------------------------- the stream


@dataclass(frozen=True)
class Claim:
    input: str
    target: str


@dataclass(frozen=True)
class Planned:
    """One event of the stream: a first report of a claim, a recurring report, or a malformed event."""

    value: bytes
    kind: str  # "first" | "recurring" | "malformed"
    event_id: str | None = None  # valid events
    reason: str | None = None  # malformed: the DLQ reason the daemon must give


def build_stream(
    model: str,
    claims: Sequence[Claim],
    labels: Sequence[str] | None,
    *,
    seed: int = 0,
    run: str = "",
    malformed_each: int = MALFORMED_EACH,
) -> list[Planned]:
    """One report per claim, recurring reports of every RECUR_EVERY-th claim by other users (another
    spelling, same target, always after the first report), and malformed events spread through it."""
    rng = random.Random(seed)
    run = run or uuid.uuid4().hex[:8]

    def valid(key: str, text: str, target: str, reporter: str, kind: str) -> Planned:
        event_id = f"chaos-{run}-{key}"
        event = {"id": event_id, "model": model, "input": text, "target": target, "reporter": reporter}
        return Planned(json.dumps(event).encode(), kind, event_id=event_id)

    events = [valid(str(i), c.input, c.target, f"user-{i}", "first") for i, c in enumerate(claims)]
    firsts = list(events)
    for k, i in enumerate(range(0, len(claims), RECUR_EVERY)):
        for r in range(1 + k % 2):
            # the same claim spelled a little differently: normalised into the same mistake
            text = f" {claims[i].input}" if r else claims[i].input.replace(" ", "  ", 1)
            at = rng.randint(events.index(firsts[i]) + 1, len(events))
            events.insert(at, valid(f"{i}-again{r}", text, claims[i].target, f"other-{k}-{r}", "recurring"))
    some = claims[0].input if claims else "a claim"
    kinds: list[tuple[str, dict[str, Any] | bytes]] = [
        ("bad_json", b'{"id": "chaos-%s-bad", "model": "%s", "input": "unterminated' % (run.encode(), model.encode())),
        ("missing_field", {"id": f"chaos-{run}-no-target", "model": model, "input": some}),
        ("wrong_type", {"id": f"chaos-{run}-int", "model": model, "input": some, "target": 1}),
    ]
    if labels:
        kinds.append(("unknown_label", {"id": f"chaos-{run}-label", "model": model, "input": some, "target": "MAYBE"}))
    else:
        kinds.append(("empty_input", {"id": f"chaos-{run}-empty", "model": model, "input": " ", "target": "x"}))
    for n in range(malformed_each):
        for reason, value in kinds:
            raw = value if isinstance(value, bytes) else json.dumps({**value, "id": f"{value['id']}-{n}"}).encode()
            events.insert(rng.randint(0, len(events)), Planned(raw, "malformed", reason=reason))
    return events


def claims_from(data: Path) -> list[Claim]:
    """claims.jsonl: one {"input": ..., "target": ...} per line."""
    out = []
    for number, line in enumerate((data / "claims.jsonl").read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                item = json.loads(line)
                out.append(Claim(str(item["input"]), str(item["target"])))
            except (ValueError, KeyError, TypeError):
                where = f"{data / 'claims.jsonl'}:{number}"
                raise SystemExit(f"{where}: expected {{'input': ..., 'target': ...}}") from None
    return out


@dataclass
class Source:
    """What the run corrects: the base, its daemon model name, the claims and where M comes from."""

    base: str  # as the daemon's [model] base takes it: a prepared name or a directory
    base_dir: Path
    model: str
    claims: list[Claim]
    labels: tuple[str, ...] | None
    memory_file: Path | None = None
    heldout_file: Path | None = None
    description: str = ""


def find_source(base: str, data: Path | None, limit: int | None) -> Source:
    """The claims to correct: claims.jsonl of `data` (with its memory.jsonl and heldout.jsonl), or
    for a prepared base with a built-in task the examples of its edit split the base gets wrong."""
    from patching.bases.datasets import load_task
    from patching.bases.load import TASK_OF_BASE, load_base
    from patching.bases.tasks import TaskAdapter

    lb = load_base(base)
    if data is not None:
        claims = claims_from(data)[:limit]
        return Source(
            base,
            lb.directory,
            lb.name,
            claims,
            lb.labels,
            data / "memory.jsonl",
            data / "heldout.jsonl",
            f"{lb.name} ({lb.directory}), {len(claims)} claims from {data / 'claims.jsonl'}",
        )
    task = TASK_OF_BASE.get(lb.name)
    if task is None:
        raise SystemExit(f"--base {base}: no built-in task to find mistakes in; give --data DIR with claims.jsonl")
    wrong = TaskAdapter(lb).mistakes(load_task(task).edit, limit=limit, progress=False)
    claims = [Claim(e.input, e.target) for e in wrong]
    return Source(
        base,
        lb.directory,
        lb.name,
        claims,
        lb.labels,
        description=f"{lb.name}: {len(claims)} real {task} claims of its edit split that it gets wrong",
    )


# ---------------------------------------------------------------------------- the processes


def _now() -> float:
    return time.time()


class Supervisor:
    """`python -m daemon run --config FILE` as systemd runs it (Restart=on-failure): started again
    RESTART_DELAY_S after any exit that was not asked for, unless it exits 0 or 2 (a bad setting:
    the unit's RestartPreventExitStatus). Its JSON log lines are kept, and written to `log_path`."""

    def __init__(self, config: Path, env: dict[str, str], log_path: Path, health_port: int):
        self.config = config
        self.env = env
        self.log_path = log_path
        self.health_port = health_port
        self.proc: subprocess.Popen[str] | None = None
        self.starts: list[dict[str, Any]] = []
        self.exits: list[dict[str, Any]] = []
        self.entries: list[tuple[float, dict[str, Any]]] = []  # (when read, log line)
        self.fatal: str | None = None
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._killed: set[int] = set()  # pids the bench killed on purpose
        self._log = log_path.open("a", encoding="utf-8")
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._spawn()
        self._thread = threading.Thread(target=self._supervise, name="chaos-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        with self._cond:
            if self._stopping.is_set():
                return
            self._spawn_locked()

    def _spawn_locked(self) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            text=True,
            cwd=ROOT,
            start_new_session=True,  # a Ctrl-C in the bench's terminal is the bench's to handle
        )
        self.proc = proc
        self.starts.append({"t": _now(), "pid": proc.pid})
        threading.Thread(target=self._read, args=(proc,), name="chaos-daemon-log", daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                entry = json.loads(line)
            except ValueError:
                entry = {"event": line.rstrip()}
            with self._cond:
                self._log.write(line)
                if isinstance(entry, dict):
                    entry.setdefault("pid", proc.pid)
                    self.entries.append((_now(), entry))
                    self._cond.notify_all()

    def _supervise(self) -> None:
        while True:
            proc = self.proc
            assert proc is not None
            code = proc.wait()
            with self._cond:
                killed = proc.pid in self._killed
                self.exits.append({"t": _now(), "pid": proc.pid, "code": code, "killed_by_bench": killed})
                self._cond.notify_all()
            if self._stopping.is_set():
                return
            if code == 0 or code == 2:
                self.fatal = f"patchd run exited with {code} on its own (see {self.log_path})"
                return
            if self._stopping.wait(RESTART_DELAY_S):
                return
            self._spawn()
            if self._stopping.is_set():
                return

    def kill(self) -> dict[str, Any]:
        """SIGKILL the running daemon (the supervisor starts it again)."""
        with self._cond:
            proc = self.proc
            assert proc is not None
            self._killed.add(proc.pid)
            doing = self.entries[-1][1].get("event") if self.entries else None
        t = _now()
        with suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        return {"t": t, "pid": proc.pid, "last_line": doing}

    def stop(self, timeout_s: float = 300.0) -> int | None:
        """A warm stop (SIGTERM), not restarted; the exit code (None: it had to be killed)."""
        with self._cond:
            self._stopping.set()
            proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        if self._thread is not None:
            self._thread.join(timeout=10)
        return code

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._stopping.set()
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    # ------------------------------------------------------------------ looking at it

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def probe(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def ready(self) -> bool:
        return self.alive and self.probe("/readyz")

    def mark(self) -> int:
        with self._cond:
            return len(self.entries)

    def wait_for(
        self, events: Sequence[str], since: int, timeout_s: float, where: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any] | None:
        """The first log line from index `since` on whose event is one of `events` (and `where`
        holds for), waiting up to `timeout_s`; None when none came."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            i = since
            while True:
                while i < len(self.entries):
                    entry = self.entries[i][1]
                    i += 1
                    if entry.get("event") in events and (where is None or where(entry)):
                        return entry
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))

    def first_after(self, event: str, t: float, not_pid: int) -> float | None:
        """When the first `event` line of another process than `not_pid` was read after `t`."""
        with self._cond:
            for at, entry in self.entries:
                if at >= t and entry.get("event") == event and entry.get("pid") != not_pid:
                    return at
        return None

    def exits_between(self, start: float, end: float) -> list[dict[str, Any]]:
        with self._cond:
            return [dict(e) for e in self.exits if start <= e["t"] <= end]


@dataclass
class Sent:
    index: int
    sent_at: float
    acked_at: float | None = None
    partition: int | None = None
    offset: int | None = None
    error: str | None = None


class Producer(threading.Thread):
    """The users' application: sends the planned stream, one event every 1/rate seconds, with its
    own kafka-python producer (acks=all, idempotent, so a broker restart never doubles a record).
    While the broker is away sends wait in the producer's buffer: up to DELIVERY_TIMEOUT_MS."""

    DELIVERY_TIMEOUT_MS = 600_000

    def __init__(self, bootstrap: str, topic: str, planned: Sequence[Planned], rate: float):
        super().__init__(name="chaos-producer", daemon=True)
        self.bootstrap = bootstrap
        self.topic = topic
        self.planned = list(planned)
        self.rate = rate
        self.sent: list[Sent] = []
        self._lock = threading.Lock()
        self._rush = threading.Event()
        self._halt = threading.Event()
        self.done = threading.Event()
        self.error: str | None = None

    def rush(self) -> None:
        """Send what is left of the stream at once."""
        self._rush.set()

    def stop(self) -> None:
        self._halt.set()
        self._rush.set()

    def run(self) -> None:
        from kafka import KafkaProducer

        producer = KafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            linger_ms=0,
            max_block_ms=self.DELIVERY_TIMEOUT_MS,
            delivery_timeout_ms=self.DELIVERY_TIMEOUT_MS,
        )
        try:
            start = time.monotonic()
            for i, planned in enumerate(self.planned):
                due = start + i / self.rate
                if not self._rush.is_set():
                    self._rush.wait(max(0.0, due - time.monotonic()))
                if self._halt.is_set():
                    break
                record = Sent(i, _now())
                with self._lock:
                    self.sent.append(record)
                future = producer.send(self.topic, value=planned.value)
                future.add_callback(self._acked, record)
                future.add_errback(self._failed, record)
            producer.flush(timeout=self.DELIVERY_TIMEOUT_MS / 1000)
        except Exception as exc:  # noqa: BLE001 - reported with the run: the stream is incomplete
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            producer.close(timeout=10)
            self.done.set()

    def _acked(self, record: Sent, metadata: Any) -> None:
        with self._lock:
            record.acked_at = _now()
            record.partition, record.offset = int(metadata.partition), int(metadata.offset)

    def _failed(self, record: Sent, exc: BaseException) -> None:
        with self._lock:
            record.error = repr(exc)

    def sent_until(self, t: float) -> list[Sent]:
        """Copies of the events sent by `t`, as they stand now (an event sent during a broker outage
        is acknowledged, with its offset, only later: ask again for the newer state)."""
        with self._lock:
            return [Sent(**asdict(s)) for s in self.sent if s.sent_at <= t]


class Watcher:
    """The downstream service: a CheckpointWatcher in a child process of its own, recording every
    version it loads or refuses as a JSON line in `records` (appended across restarts)."""

    def __init__(self, root: Path, model: str, base_dir: Path, records: Path, log: Path, env: dict[str, str]):
        self.argv = [
            sys.executable, "-m", "daemon.tools.bench_chaos", "watcher",
            str(root), model, str(base_dir), str(records), str(WATCH_INTERVAL_S),
        ]  # fmt: skip
        self.records_path = records
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env, cwd=ROOT,
                start_new_session=True,
            )  # fmt: skip

    def kill(self) -> int:
        assert self.proc is not None
        pid = self.proc.pid
        self.proc.kill()
        self.proc.wait()
        return pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def records(self) -> list[dict[str, Any]]:
        try:
            lines = self.records_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            with suppress(ValueError):  # a line cut by a SIGKILL
                out.append(json.loads(line))
        return out


def watcher_main(argv: Sequence[str]) -> int:
    """The watcher child: `python -m daemon.tools.bench_chaos watcher ROOT MODEL BASE_DIR RECORDS INTERVAL`."""

    from patching.client import CheckpointWatcher

    root, model, base_dir, records, interval = argv
    out = open(records, "a", encoding="utf-8")  # noqa: SIM115 - open for the process's life
    lock = threading.Lock()

    def write(**fields: Any) -> None:
        with lock:
            out.write(json.dumps({"t": _now(), "pid": os.getpid(), **fields}) + "\n")
            out.flush()

    class Warnings(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            write(event="log", level=record.levelname, message=record.getMessage()[:500])

    logging.getLogger("patching.client").addHandler(Warnings(logging.WARNING))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    write(event="start")

    def swapped(loaded: Any) -> None:
        write(event="loaded", ok=True, version=loaded.version, edits=len(loaded.edits),
              neurons=loaded.manifest.get("neurons"))  # fmt: skip

    watcher = CheckpointWatcher(root, model, base_dir, interval=float(interval), on_swap=swapped)
    write(event="serving", version=watcher.version)
    watcher.start()
    told: set[int] = set()
    errors = 0
    while not stop.wait(0.2):
        for number, why in watcher.refused.items():
            if number not in told:
                told.add(number)
                write(event="refused", ok=False, version=number, error=why[:500])
        if watcher.errors > errors:
            errors = watcher.errors
            write(event="check_failed", ok=False, errors=errors)
    watcher.stop()
    write(event="stop", version=watcher.version)
    return 0


class LatestSampler(threading.Thread):
    """Reads LATEST and verifies its whole version every SAMPLE_S, as a reader arriving at any
    moment would: a sample that fails, or a LATEST that moves backwards, is a failure."""

    def __init__(self, storage: FileStorage, model: str):
        super().__init__(name="chaos-latest", daemon=True)
        self.storage = storage
        self.model = model
        self.checks = 0
        self.failures: list[dict[str, Any]] = []
        self.latest: int | None = None
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.wait(SAMPLE_S):
            self.sample()

    def sample(self) -> None:
        from patching.checkpoint import read_verified

        number = None
        try:
            number = self.storage.latest(self.model)
            if number is None:
                return
            read_verified(self.storage, self.model, number)
        except Exception as exc:  # noqa: BLE001 - every failure is the finding
            self.checks += 1
            self.failures.append({"t": _now(), "version": number, "error": f"{type(exc).__name__}: {exc}"[:500]})
            return
        self.checks += 1
        if self.latest is not None and number < self.latest:
            self.failures.append({"t": _now(), "version": number, "error": f"LATEST went back from {self.latest}"})
        self.latest = number


# ---------------------------------------------------------------------------- the run


@dataclass
class Options:
    base: str = "fever-minilm"
    data: Path | None = None  # claims.jsonl, memory.jsonl, heldout.jsonl for a local --base
    minutes: float = MINUTES  # the SIGKILL phase
    broker_down_s: float = BROKER_DOWN_S
    kill_every_s: tuple[float, float] = KILL_EVERY_S
    min_kills: int = 1  # kills go on past --minutes until there were this many
    claims: int | None = None  # at most this many claims (default: every one found)
    rate: float | None = None  # events a second (default: the stream spans the planned run)
    malformed_each: int = MALFORMED_EACH
    seed: int = 0
    json_path: Path | None = None
    work: Path | None = None  # default: a temporary directory, removed unless the run failed
    keep: bool = False
    say: Callable[[str], None] = field(default=print)


@dataclass
class Missing:
    valid: int = 0
    malformed: int = 0

    @property
    def total(self) -> int:
        return self.valid + self.malformed


class Chaos:
    """One run: set up in `__enter__`-like steps by run_chaos, faults as methods, checks at the end."""

    def __init__(self, opts: Options, report: dict[str, Any]):
        self.opts = opts
        self.report = report
        self.t0 = _now()
        self.rng = random.Random(opts.seed)
        self.samples: list[dict[str, Any]] = []  # (t, sent, stored, ready) every SAMPLE_S
        self._store: Store | None = None
        self._store_lock = threading.Lock()
        self._sampling = threading.Event()
        # set by setup
        self.source: Source
        self.planned: list[Planned]
        self.work: Path
        self.storage_root: Path
        self.mounted = False
        self.mount_error: str | None = None
        self.broker: BrokerScript
        self.pg: PostgresServer
        self.topic: str
        self.config: Path
        self.settings: Settings
        self.daemon: Supervisor
        self.watcher: Watcher
        self.producer: Producer
        self.sampler: LatestSampler
        self.env: dict[str, str] = {}
        self.remove_work = False  # set when the run succeeded: the work directory goes last

    def say(self, message: str) -> None:
        self.opts.say(f"[{_now() - self.t0:7.1f}s] {message}")

    def rel(self, t: float | None) -> float | None:
        return None if t is None else round(t - self.t0, 2)

    # ------------------------------------------------------------------ set-up

    def setup(self, stack: ExitStack) -> None:
        opts = self.opts
        self.say(f"finding the claims to correct (--base {opts.base}) ...")
        self.source = find_source(opts.base, opts.data, opts.claims)
        src = self.source
        if not src.claims:
            raise SystemExit(f"--base {opts.base}: no claims to correct")
        run = uuid.uuid4().hex[:8]
        self.planned = build_stream(
            src.model, src.claims, src.labels, seed=opts.seed, run=run, malformed_each=opts.malformed_each
        )
        self.say(f"stream: {src.description}; {len(self.planned)} events")
        if opts.work is not None:
            self.work = opts.work
            self.work.mkdir(parents=True, exist_ok=True)
        else:
            self.work = Path(tempfile.mkdtemp(prefix="patchd-chaos-"))
        self.report["work_dir"] = str(self.work)
        self.storage_root = self.work / "checkpoints"
        self.storage_root.mkdir(exist_ok=True)
        self.mounted, self.mount_error = mount_tmpfs(self.storage_root, TMPFS_MB)
        if self.mounted:
            stack.callback(self._unmount)
        self.say(
            f"storage root {self.storage_root}: "
            + (f"tmpfs of {TMPFS_MB} MB" if self.mounted else f"a plain directory ({self.mount_error})")
        )

        self.broker = BrokerScript.on_free_ports(self.work / "kafka")
        self.say(f"starting the Kafka broker on {self.broker.bootstrap} ...")
        self.broker.start()
        stack.callback(self._stop_broker)
        self.topic = f"chaos-{run}"
        create_topics(self.broker.bootstrap, self.topic)
        self.pg = PostgresServer(durable=True)
        self.say("starting PostgreSQL ...")
        self.pg.start()
        stack.callback(self.pg.stop)

        env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHD_") or k in PASSED_ENV}
        # one torch thread, no spinning OpenMP workers: the figures of a shared 2-core machine, and
        # the same thread count as the in-process re-run that the final model is compared with
        env.update(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
        self.env = env
        health_port = free_ports(1)[0]
        self.config = write_config(self.work / "patchd.toml", src, self, health_port)
        from daemon.settings import load_settings

        self.settings = load_settings(self.config, env)
        self.report["config"]["settings"] = {
            "publish_interval_s": self.settings.publish.interval_s,
            "keep_versions": self.settings.publish.keep_versions,
            "snapshot_every": self.settings.state.snapshot_every,
            "health_port": health_port,
        }
        self.daemon = Supervisor(self.config, env, self.work / "daemon.log", health_port)
        stack.callback(self.daemon.close)
        self.watcher = Watcher(
            self.storage_root, src.model, src.base_dir, self.work / "watcher.jsonl", self.work / "watcher.log", env
        )
        stack.callback(self.watcher.stop)

    def _stop_broker(self) -> None:
        try:
            self.broker.stop()
        except Exception as exc:  # noqa: BLE001 - the run's own outcome matters more
            self.say(f"stopping the broker failed: {exc}")

    def _unmount(self) -> None:
        done = subprocess.run(["umount", str(self.storage_root)], capture_output=True, text=True)
        if done.returncode != 0:  # something still has a file open there: detach it now, freed when closed
            subprocess.run(["umount", "-l", str(self.storage_root)], capture_output=True)

    def remove_work_dir(self) -> None:
        if not hasattr(self, "work"):
            return
        if self.remove_work:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            self.say(f"work directory kept: {self.work} (daemon.log, watcher.jsonl, patchd.toml)")

    def start(self) -> None:
        """The daemon until it is ready, the watcher, the samplers, then the stream."""
        self.say("starting patchd run (the first start builds the memory set M) ...")
        self.daemon.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.daemon.ready():
            if self.daemon.fatal or time.monotonic() > deadline:
                raise RuntimeError(self.daemon.fatal or f"patchd run not ready in {READY_TIMEOUT_S:.0f}s")
            time.sleep(POLL_S)
        self.report["startup_s"] = round(_now() - self.daemon.starts[0]["t"], 1)
        self.say(f"daemon ready after {self.report['startup_s']}s")
        from memory.store import Store
        from patching.storage import FileStorage

        assert self.settings.database.url is not None
        self._store = Store.open(self.settings.database.url, upgrade=False)
        self.watcher.start()
        self.sampler = LatestSampler(FileStorage(self.storage_root), self.source.model)
        self.sampler.start()
        threading.Thread(target=self._sample, name="chaos-lag", daemon=True).start()
        rate = self.opts.rate or planned_rate(len(self.planned), self.opts)
        self.report["config"]["rate_events_per_s"] = round(rate, 3)
        self.producer = Producer(self.broker.bootstrap, self.topic, self.planned, rate)
        self.producer.start()
        self.say(f"producing {len(self.planned)} events at {rate:.2f}/s")
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while (self.stored_count() or 0) < min(WARMUP_EVENTS, len(self.planned)):
            if time.monotonic() > deadline:
                raise RuntimeError("the first events were not stored: the daemon does not consume")
            time.sleep(POLL_S)

    def close(self) -> None:
        self._sampling.set()
        if hasattr(self, "producer"):
            self.producer.stop()
        if hasattr(self, "sampler"):
            self.sampler.stop()
        if self._store is not None:
            self._store.close()

    # ------------------------------------------------------------------ what is stored

    def stored(self) -> tuple[set[str], set[tuple[int, int]]] | None:
        """The event ids of the stored reports and the (partition, offset) of the rejected events;
        None while the database does not answer."""
        assert self._store is not None
        try:
            with self._store_lock:
                return self._store.event_ids(self.source.model), set(self._store.rejected_offsets(self.topic))
        except Exception:  # noqa: BLE001 - restarting, unreachable: "unknown", never "nothing"
            return None

    def stored_count(self) -> int | None:
        got = self.stored()
        return None if got is None else len(got[0]) + len(got[1])

    def missing(self, sent: Sequence[Sent], got: tuple[set[str], set[tuple[int, int]]]) -> Missing:
        """Of the events `sent`, those not stored (valid: by event id; malformed: by source offset)."""
        ids, rejected = got
        out = Missing()
        for s in sent:
            planned = self.planned[s.index]
            if planned.kind == "malformed":
                out.malformed += s.offset is None or (s.partition, s.offset) not in rejected
            else:
                out.valid += planned.event_id not in ids
        return out

    def _sample(self) -> None:
        while not self._sampling.wait(SAMPLE_S):
            t = _now()
            sent = self.producer.sent_until(t)
            got = self.stored()
            lag = None if got is None else self.missing(sent, got).total
            self.samples.append({"t": t, "sent": len(sent), "lag": lag, "ready": self.daemon.ready()})

    def peak_lag(self, start: float, end: float) -> int | None:
        lags = [s["lag"] for s in self.samples if start <= s["t"] <= end and s["lag"] is not None]
        return max(lags) if lags else None

    def ready_share(self, start: float, end: float) -> float | None:
        window = [s["ready"] for s in self.samples if start <= s["t"] <= end]
        return round(sum(window) / len(window), 2) if window else None

    # ------------------------------------------------------------------ recovery

    def recover(self, fault_end: float, settle_s: float = SETTLE_S) -> dict[str, Any]:
        """From `fault_end` until the daemon is ready and has stored everything sent before it, and
        stays so for `settle_s`: recovery_s, ready_s, held_back (missing at the end), lost."""
        sent = self.producer.sent_until(fault_end)
        got = self.stored()
        held_back = None if got is None else self.missing(sent, got).total
        ready_since: float | None = None
        recovered_at: float | None = None
        # stored is not patched: the worker must be at work again too, its queue empty once
        cleared_at: float | None = None
        settled = False
        deadline = fault_end + RECOVERY_TIMEOUT_S + settle_s
        while not settled and _now() < deadline and not self.daemon.fatal:
            now = _now()
            if not self.daemon.ready():
                ready_since = recovered_at = cleared_at = None  # down again (a late restart): it starts over
            else:
                ready_since = ready_since or now
                sent = self.producer.sent_until(fault_end)  # the same events, their acks updated
                got = self.stored()
                if got is None or self.missing(sent, got).total:
                    recovered_at = cleared_at = None
                else:
                    recovered_at = recovered_at or now
                    if cleared_at is None and self.backlog() == 0:
                        cleared_at = now
                    settled = now - recovered_at >= settle_s
            if not settled:
                time.sleep(POLL_S)
        lost: int | None = 0
        if not settled:
            recovered_at = cleared_at = None
            sent = self.producer.sent_until(fault_end)
            got = self.stored()
            lost = self.missing(sent, got).total if got is not None else None
        elif cleared_at is None:
            cleared_at = wait_until(lambda: self.backlog() == 0, RECOVERY_TIMEOUT_S)
        return {
            "recovery_s": None if recovered_at is None else round(recovered_at - fault_end, 2),
            "ready_s": None if ready_since is None else round(max(0.0, ready_since - fault_end), 2),
            "backlog_cleared_s": None if cleared_at is None else round(cleared_at - fault_end, 2),
            "held_back": held_back,
            "lost": lost,
            "recovered_at": recovered_at,
        }

    def backlog(self) -> int | None:
        """Mistakes waiting for the worker (queued or being patched); None while the database is away."""
        assert self._store is not None
        try:
            with self._store_lock:
                return self._store.backlog(self.source.model, self.settings.policy.quorum)
        except Exception:  # noqa: BLE001 - unknown, not zero
            return None

    def fault_entry(self, name: str, start: float, end: float, rec: dict[str, Any], notes: str) -> dict[str, Any]:
        until = rec.get("recovered_at") or _now()
        exits = self.daemon.exits_between(start, until)
        entry = {
            "name": name,
            "run": True,
            "started": self.rel(start),
            "ended": self.rel(end),
            "recovery_s": rec["recovery_s"],
            "ready_s": rec["ready_s"],
            "backlog_cleared_s": rec["backlog_cleared_s"],
            "held_back": rec["held_back"],
            "peak_lag": self.peak_lag(start, until),
            "lost": rec["lost"],
            "daemon_exits": [{**e, "t": self.rel(e["t"])} for e in exits],
            "notes": notes,
        }
        return entry

    # ------------------------------------------------------------------ the faults

    def broker_down(self) -> dict[str, Any]:
        down = self.opts.broker_down_s
        self.say(f"fault 1: stopping the broker for {down:.0f}s")
        start = _now()
        self.broker.stop()
        stopped = _now()
        time.sleep(max(0.0, down - (stopped - start)))
        self.broker.start()
        end = _now()
        self.say(f"fault 1: broker back after {end - start:.1f}s; waiting for the daemon to catch up")
        ready_share = self.ready_share(start, end)
        rec = self.recover(end)
        notes = (
            f"broker stopped (broker.sh stop) and started again on the same state and ports, {end - start:.1f}s "
            f"without a broker; /readyz answered 200 in {100 * (ready_share or 0):.0f}% of the samples meanwhile"
        )
        return self.fault_entry(f"broker stopped {down:.0f} s", start, end, rec, notes)

    def postgres_restart(self) -> dict[str, Any]:
        self.say("fault 2: restarting PostgreSQL right after the daemon stores something")
        mark = self.daemon.mark()
        after = self.daemon.wait_for(("batch stored", "mistake done"), mark, 60.0)
        time.sleep(self.rng.uniform(0.0, 0.02))
        start = _now()
        self.pg.restart("fast")
        end = _now()
        self.say(f"fault 2: PostgreSQL back after {end - start:.1f}s; waiting for the daemon")
        rec = self.recover(end, settle_s=PG_SETTLE_S)
        exits = self.daemon.exits_between(start, rec.get("recovered_at") or _now())
        codes = ", ".join(str(e["code"]) for e in exits) or "none"
        notes = (
            f"pg_ctl restart -m fast {end - start:.1f}s, right after the daemon logged "
            f"{(after or {}).get('event')!r}; daemon exits meanwhile: {codes} (restarted as systemd would)"
        )
        return self.fault_entry("PostgreSQL restarted", start, end, rec, notes)

    def storage_full(self) -> dict[str, Any]:
        name = "storage root full during a publish"
        if not self.mounted:
            return {"name": name, "run": False, "notes": f"not run: no tmpfs could be mounted ({self.mount_error})"}
        from patching.checkpoint import read_verified

        storage = self.sampler.storage
        model = self.source.model
        self.say(f"fault 3: filling the storage root (LATEST is version {storage.latest(model)})")
        mark = self.daemon.mark()
        start = _now()
        filler = self.storage_root / "filler"
        filled = fill(filler)
        # a publish that finished its writes while the filler grew may still have flipped LATEST:
        # from here on nothing can be written, so LATEST must stay what it is now
        before = storage.latest(model)
        failed = self.daemon.wait_for(
            (PUBLISH_FAILED,), mark, PUBLISH_FAIL_TIMEOUT_S, where=lambda e: "No space left" in str(e.get("error", ""))
        )
        seen_at = _now()
        alive = self.daemon.alive and self.daemon.probe("/livez")
        latest = storage.latest(model)
        verifies = False
        if latest is not None:
            with suppress(Exception):  # anything raised is "does not verify"
                read_verified(storage, model, latest)
                verifies = True
        leftovers = hidden_entries(self.storage_root / model)
        filler.unlink()
        end = _now()
        self.say(
            "fault 3: "
            + (f"publish failed after {seen_at - start:.1f}s" if failed else "no publish failed")
            + f", daemon alive: {alive}, LATEST {latest} (verifies: {verifies}); space freed"
        )
        newer: list[int] = []

        def published() -> bool:
            number = storage.latest(model) or 0
            if number > (latest or 0):
                newer.append(number)
            return bool(newer)

        published_at = wait_until(published, RECOVERY_TIMEOUT_S)
        rec = self.recover(end)
        after = newer[0] if newer else None
        entry = self.fault_entry(name, start, end, rec, "")
        entry.update(
            publish_failed_s=round(seen_at - start, 2) if failed else None,
            publish_error=str((failed or {}).get("error"))[:300] if failed else None,
            daemon_alive_while_full=alive,
            latest_when_full=before,
            latest_while_full=latest,
            latest_unchanged_and_verified=bool(verifies and latest == before),
            next_version=after,
            next_version_s=None if published_at is None else round(published_at - end, 2),
            hidden_entries_while_full=leftovers,
            hidden_entries_after=hidden_entries(self.storage_root / model),
            filled_bytes=filled,
        )
        # the storage fault's own recovery: space freed -> a new version published
        entry["recovery_s"] = entry["next_version_s"]
        entry["notes"] = (
            f"tmpfs of {TMPFS_MB} MB filled ({filled} bytes); the daemon "
            + ("logged the failed publish (ENOSPC)" if failed else "did NOT log a failed publish")
            + f", stayed {'alive' if alive else 'DOWN'}, LATEST stayed version {latest} "
            + ("(verifies)" if verifies and latest == before else "(CHANGED or not verifying)")
            + f"; after freeing, version {after} published in {entry['next_version_s']}s"
        )
        if not failed or not alive or not (verifies and latest == before) or published_at is None:
            entry["failed_checks"] = True
        return entry

    def kills(self) -> dict[str, Any]:
        low, high = self.opts.kill_every_s
        phase_end = _now() + self.opts.minutes * 60
        self.say(f"fault 4: SIGKILL the daemon every {low:.0f}-{high:.0f}s for {self.opts.minutes:g} min")
        start = _now()
        kills: list[dict[str, Any]] = []
        next_kill = start + self.rng.uniform(low, high)
        while True:
            if _now() >= phase_end and len(kills) >= self.opts.min_kills:
                break
            time.sleep(max(0.0, next_kill - _now()))
            # right after a progress line: the kill lands in the middle of work
            self.daemon.wait_for(PROGRESS, self.daemon.mark(), KILL_AIM_S)
            time.sleep(self.rng.uniform(0.0, 0.05))
            kill = self.daemon.kill()
            rec = self.recover(kill["t"], settle_s=1.0)
            # where the time went: the new process loaded the model and connected to Kafka, then
            # waited for the group to give it the partition (the killed member's session expires)
            connected = self.daemon.first_after("kafka connected", kill["t"], kill["pid"])
            kills.append({
                "at": self.rel(kill["t"]),
                "pid": kill["pid"],
                "last_line": kill["last_line"],
                "recovery_s": rec["recovery_s"],
                "connected_s": None if connected is None else round(connected - kill["t"], 2),
                "ready_s": rec["ready_s"],
                "backlog_cleared_s": rec["backlog_cleared_s"],
                "held_back": rec["held_back"],
                "lost": rec["lost"],
            })  # fmt: skip
            self.say(
                f"fault 4: kill {len(kills)} (after {kill['last_line']!r}): recovered in {rec['recovery_s']}s "
                f"(ready {rec['ready_s']}s), held back {rec['held_back']}, lost {rec['lost']}"
            )
            if rec["recovery_s"] is None:
                break  # a daemon that does not come back: the remaining kills would measure nothing
            # the next kill 20-40 s after this one, and never before the daemon has recovered
            next_kill = max(kill["t"] + self.rng.uniform(low, high), _now() + self.rng.uniform(1.0, 3.0))
        end = _now()
        times = [k["recovery_s"] for k in kills if k["recovery_s"] is not None]
        return {
            "name": f"daemon SIGKILLed x{len(kills)}",
            "run": True,
            "started": self.rel(start),
            "ended": self.rel(end),
            "recovery_s": max(times) if len(times) == len(kills) else None,
            "recovery_s_median": round(statistics.median(times), 2) if times else None,
            "ready_s": max((k["ready_s"] for k in kills if k["ready_s"] is not None), default=None),
            "backlog_cleared_s": None
            if any(k["backlog_cleared_s"] is None for k in kills)
            else max(k["backlog_cleared_s"] for k in kills),
            "ready_s_median": round(statistics.median([k["ready_s"] for k in kills if k["ready_s"] is not None]), 2)
            if times
            else None,
            "held_back": max((k["held_back"] or 0) for k in kills),
            "peak_lag": self.peak_lag(start, end),
            "lost": sum((k["lost"] or 0) if k["lost"] is not None else 1 for k in kills),
            "kills": kills,
            "daemon_exits": [{**e, "t": self.rel(e["t"])} for e in self.daemon.exits_between(start, end)],
            "notes": f"{len(kills)} SIGKILLs, each right after a progress line; restarted after "
            f"{RESTART_DELAY_S:g}s; recovery_s and ready_s are the worst kill's, recovery_s_median the median",
        }

    def watcher_kill(self) -> dict[str, Any]:
        storage = self.sampler.storage
        model = self.source.model
        latest = storage.latest(model)
        self.say(f"fault 5: SIGKILL the downstream watcher (LATEST is version {latest})")
        start = _now()
        pid = self.watcher.kill()
        self.watcher.start()
        end = _now()

        def serving() -> bool:
            for r in self.watcher.records():
                if r.get("pid") != pid and r["t"] >= end and r.get("event") in ("loaded", "serving"):
                    if r.get("version") is not None and r["version"] >= (latest or 0):
                        return True
            return False

        served_at = wait_until(serving, RECOVERY_TIMEOUT_S)
        rec = self.recover(end)
        entry = self.fault_entry("downstream watcher SIGKILLed", start, end, rec, "")
        entry["daemon_recovery_s"] = entry["recovery_s"]
        entry["recovery_s"] = None if served_at is None else round(served_at - end, 2)
        entry["lost"] = 0 if served_at is not None and rec["lost"] == 0 else (rec["lost"] or 1)
        entry["notes"] = f"the watcher (pid {pid}) killed and started again: serving version >= {latest} " + (
            f"after {entry['recovery_s']}s (base load, verify, build)" if served_at else "NOT served in time"
        )
        return entry

    # ------------------------------------------------------------------ the end

    def drain(self) -> dict[str, Any]:
        """Send the rest of the stream, then wait until everything is stored, patched and published."""
        self.say("sending the rest of the stream and draining")
        self.producer.rush()
        self.producer.done.wait(self.producer.DELIVERY_TIMEOUT_MS / 1000 + 30)
        start = _now()
        from daemon.publisher import storage_of
        from memory.lifecycle import Status

        assert self._store is not None
        storage = storage_of(self.settings)
        model = self.source.model

        def drained() -> bool:
            got = self.stored()
            if got is None or self.missing(self.producer.sent_until(_now()), got).total:
                return False
            assert self._store is not None
            with self._store_lock:
                status = self._store.status_counts(model)
                ids = [p for p, _ in self._store.accepted_patch_ids(model)]
            if status.get(Status.QUEUED, 0) or status.get(Status.PATCHING, 0) or status.get(Status.REPORTED, 0):
                return False
            latest = storage.latest(model)
            if not ids:
                return True
            if latest is None:
                return False
            from patching.checkpoint import read_verified

            return read_verified(storage, model, latest).patch_ids == ids

        done_at = wait_until(drained, DRAIN_TIMEOUT_S)
        self.say(f"drained in {_now() - start:.1f}s" if done_at else "NOT drained in time")
        return {"drained": done_at is not None, "drain_s": None if done_at is None else round(done_at - start, 2)}

    def finish(self) -> dict[str, Any]:
        """Stop everything the warm way, then the final checks and the uninterrupted re-run."""
        self._sampling.set()
        self.sampler.stop()
        self.sampler.join(timeout=10)
        self.sampler.sample()  # one last look at the final version
        self.watcher.stop()
        self.say("stopping the daemon (SIGTERM: warm stop)")
        code = self.daemon.stop()
        self.say(f"daemon stopped: exit {code}")
        out = {"final_exit": code}
        out.update(self.checks())
        return out

    def checks(self) -> dict[str, Any]:
        from memory.lifecycle import Status
        from patching.storage import FileStorage

        assert self._store is not None
        store = self._store
        model = self.source.model
        sent = self.producer.sent_until(_now())
        valid_ids = {self.planned[s.index].event_id for s in sent if self.planned[s.index].kind != "malformed"}
        malformed = {
            (s.partition, s.offset): self.planned[s.index].reason
            for s in sent
            if self.planned[s.index].kind == "malformed" and s.offset is not None
        }
        ids = store.event_ids(model)
        counts = store.table_counts()
        rejected = store.rejected_offsets(self.topic)
        status = store.status_counts(model)
        accepted = store.accepted_patches(model)
        kept = Counter(p.mistake_id for p in accepted)
        dlq = read_dlq(self.broker.bootstrap, f"{self.topic}.dlq")
        unique_dlq = {(int(d["source_partition"]), int(d["source_offset"])): d["reason"] for d in dlq}
        sampler_failures = list(self.sampler.failures)
        watcher = self.watcher.records()
        loads = [r for r in watcher if r.get("event") == "loaded"]
        watcher_failures = [r for r in watcher if r.get("ok") is False or r.get("level") == "ERROR"]
        self.say(f"re-running the {len(store.verdicts(model))} verdicts in order on a fresh model ...")
        rerun = compare_uninterrupted(self.settings, store)
        published = compare_published(FileStorage(self.storage_root), model, accepted)
        self.say(
            f"re-run: {rerun['compared_neurons']} neurons compared, equal: {rerun['neurons_equal']}, "
            f"verdicts equal: {rerun['verdicts_equal']}; published version {published['version']} equal: "
            f"{published['equal']}"
        )
        failures = len(sampler_failures) + len(watcher_failures)
        lost_valid = len(valid_ids - ids)
        lost_malformed = len(set(malformed) - set(rejected))
        totals = {
            "produced": len(sent),
            "acked": sum(1 for s in sent if s.offset is not None),
            "produce_errors": sum(1 for s in sent if s.error),
            "valid": len(valid_ids),
            "recurring": sum(1 for s in sent if self.planned[s.index].kind == "recurring"),
            "malformed": len(malformed),
            "stored": len(ids & valid_ids),
            "stored_not_sent": len(ids - valid_ids),
            "reports_rows": counts["reports"],
            "rejected_rows": len(rejected),
            "rejected_as_expected": {k: v for k, v in rejected.items() if malformed.get(k) == v} == malformed
            and set(rejected) == set(malformed),
            "dead_lettered": len(unique_dlq),
            "dlq_records": len(dlq),
            "dead_letters_as_expected": unique_dlq == malformed,
            "lost": lost_valid + lost_malformed,
            # an event stored twice: a report row or a rejected row more than once
            "duplicates": counts["reports"] - len(ids) + counts["rejected"] - len(rejected),
            "mistakes": counts["mistakes"],
            "distinct_claims_sent": len({claim_of(self.planned[s.index]) for s in sent} - {None}),
            "statuses": {str(k): v for k, v in sorted(status.items()) if v},
            "left_open": sum(status.get(Status(s), 0) for s in OPEN_AFTER_DRAIN),
            "patches_kept": len(accepted),
            "duplicate_neurons": sum(1 for n in kept.values() if n > 1),
            "neurons": sum(p.n_neurons for p in accepted),
            "neurons_equal_to_uninterrupted": bool(rerun["equal"]),
            "uninterrupted": rerun,
            "published": published,
            "latest_checks": self.sampler.checks + len(loads),
            "latest_failures": failures,
            "latest_sampler": {"checks": self.sampler.checks, "failures": sampler_failures[:20]},
            "watcher": {
                "loads": len(loads),
                "versions_loaded": sorted({r["version"] for r in loads}),
                "failures": watcher_failures[:20],
                "processes": len({r["pid"] for r in watcher}),
            },
            "daemon_starts": len(self.daemon.starts),
            "daemon_exits": [{**e, "t": self.rel(e["t"])} for e in self.daemon.exits],
            "versions_published": len(store.versions(model)),
        }
        return totals


# ---------------------------------------------------------------------------- helpers


def claim_of(planned: Planned) -> str | None:
    """The claim a valid event reports (its first report's event id), None for a malformed one."""
    return None if planned.event_id is None else planned.event_id.split("-again")[0]


def planned_rate(events: int, opts: Options) -> float:
    """Events a second so that the stream spans the planned faults (the rest is sent at the end)."""
    planned_s = 20 + opts.broker_down_s + 40 + PG_SETTLE_S + 30 + 40 + opts.minutes * 60 + 30
    return min(20.0, max(0.2, events / planned_s))


def write_config(path: Path, src: Source, chaos: Chaos, health_port: int) -> Path:
    """The daemon's settings file: everything explicit, nothing from the bench's environment."""

    def q(value: object) -> str:
        return json.dumps(str(value))  # a TOML basic string is a JSON string

    memory = ""
    if src.memory_file is not None and src.heldout_file is not None:
        memory = f"memory_file = {q(src.memory_file)}\nheldout_file = {q(src.heldout_file)}\n"
    path.write_text(
        f"""# written by patchd bench chaos
device = "cpu"
[model]
name = {q(src.model)}
base = {q(src.base)}
{memory}[kafka]
bootstrap_servers = [{q(chaos.broker.bootstrap)}]
topic = {q(chaos.topic)}
group_id = {q("patchd-" + chaos.topic)}
[database]
url = {q(chaos.pg.url)}
[state]
dir = {q(chaos.work / "state")}
[storage]
root = {q(chaos.storage_root)}
[health]
port = {health_port}
[log]
level = "INFO"
"""
    )
    return path


def mount_tmpfs(path: Path, size_mb: int) -> tuple[bool, str | None]:
    """Mount a tmpfs of `size_mb` at `path` (needs root); (mounted, why not)."""
    if os.geteuid() != 0:
        return False, "not root: mount -t tmpfs needs root"
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        return False, f"mount -t tmpfs failed: {(done.stderr or done.stdout).strip()}"
    return True, None


def fill(path: Path) -> int:
    """Write zeros into `path` until the file system is full (ENOSPC); the bytes written."""
    import errno

    written = 0
    with open(path, "wb", buffering=0) as fh:
        for chunk in (1 << 20, 1 << 12, 1):
            block = b"\0" * chunk
            while True:
                try:
                    written += fh.write(block) or 0
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return written


def hidden_entries(model_dir: Path) -> list[str]:
    """Temporary and trash entries (names starting with ".") under a model's storage directory."""
    out = []
    for sub in (model_dir, model_dir / "versions", model_dir / "segments"):
        with suppress(FileNotFoundError):
            out += [f"{sub.name}/{p.name}" for p in sub.iterdir() if p.name.startswith(".")]
    return sorted(out)


def wait_until(condition: Callable[[], bool], timeout_s: float) -> float | None:
    """When `condition` first held (polled every POLL_S), or None after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return _now()
        except Exception:  # noqa: BLE001 - a reader meeting a restart: look again
            pass
        time.sleep(POLL_S)
    return None


def read_dlq(bootstrap: str, topic: str, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Every record on the DLQ topic (partition 0, from the start): reason and source of each."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    tp = TopicPartition(topic, 0)
    out: list[dict[str, Any]] = []
    try:
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        deadline = time.monotonic() + timeout_s
        while consumer.position(tp) < end and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                for record in batch:
                    headers = {k: v.decode("utf-8", "replace") for k, v in record.headers}
                    out.append({k: headers.get(k) for k in ("reason", "source_partition", "source_offset")})
    finally:
        consumer.close()
    return out


def _bits(tensor: Any) -> bytes:
    """A tensor's exact bytes (a float comparison would call NaN unequal to itself)."""
    import torch

    return bytes(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def _neuron_bits(neurons: bytes, edit_id: str) -> tuple[bytes, bytes, bytes, str]:
    from patching import patchfile

    nr = patchfile.decode(neurons, edit_id=edit_id)
    return _bits(nr.keys), _bits(nr.biases), _bits(nr.values), str(nr.keys.dtype)


def compare_uninterrupted(settings: Settings, store: Store) -> dict[str, Any]:
    """Re-run the daemon's verdicts, in the order they were stored, on a fresh model with its
    settings, in this process: every verdict and every kept neuron must come out identical.

    Training is deterministic given the seed and the model's state, and a verdict's state is the
    base plus the patches kept before it; so if the daemon's restarts (snapshot, replay) rebuilt
    exactly the model an uninterrupted run has, the re-run gives the same bytes."""
    import torch

    from daemon.model import PatchedModel
    from daemon.worker import training_equivalents
    from memory.lifecycle import Status

    model_name = settings.model.name
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the daemon ran with OMP_NUM_THREADS=1: the same kernels, the same sums
    t0 = time.perf_counter()
    try:
        model = PatchedModel.load(settings)
        model.snapshot_path = None  # this audit must never overwrite the daemon's engine snapshot
        kept: dict[int, list[Any]] = {}
        for patch in store.accepted_patches(model_name):
            kept.setdefault(patch.mistake_id, []).append(patch)
        verdicts = store.verdicts(model_name)
        mismatches: list[dict[str, Any]] = []
        compared = equal = 0
        got_counts: Counter[str] = Counter()
        for mistake_id, stored in verdicts:
            mistake = store.get_mistake(mistake_id)
            assert mistake is not None
            proposal = model.propose(mistake, training_equivalents(mistake, settings.policy))
            if proposal is None:
                got = Status.ALREADY_FIXED
            else:
                got = Status.PATCHED if proposal.accepted else Status.GATE_REJECTED
            got_counts[str(got)] += 1
            if got != stored:
                mismatches.append({"mistake_id": mistake_id, "stored": str(stored), "rerun": str(got)})
            if proposal is not None and proposal.accepted:
                row = model.patch_row(proposal)
                theirs = kept.get(mistake_id, [])
                if stored == Status.PATCHED and len(theirs) == 1:
                    compared += row.n_neurons
                    if _neuron_bits(row.neurons, str(mistake_id)) == _neuron_bits(theirs[0].neurons, str(mistake_id)):
                        equal += row.n_neurons
                    else:
                        mismatches.append({"mistake_id": mistake_id, "neurons": "differ"})
                model.commit(proposal, theirs[0].id if theirs else -1, row)
    finally:
        torch.set_num_threads(threads)
    stored_neurons = sum(p.n_neurons for ps in kept.values() for p in ps)
    return {
        "verdicts": len(verdicts),
        "rerun_outcomes": dict(got_counts),
        "compared_neurons": compared,
        "equal_neurons": equal,
        "stored_neurons": stored_neurons,
        "verdicts_equal": not any("stored" in m for m in mismatches),
        "neurons_equal": compared == equal == stored_neurons,
        "equal": not mismatches and compared == equal == stored_neurons,
        "mismatches": mismatches[:20],
        "mismatch_count": len(mismatches),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def compare_published(storage: FileStorage, model: str, accepted: Sequence[Any]) -> dict[str, Any]:
    """LATEST's version against the store's kept patches: the same patches, the same neuron bytes."""
    from patching import patchfile
    from patching.checkpoint import read_verified
    from patching.client import patch_set

    number = storage.latest(model)
    if number is None:
        return {"version": None, "equal": not accepted, "neurons": 0}
    v = read_verified(storage, model, number)
    config, published = patch_set(v)
    parts = [patchfile.decode(p.neurons, where=f"patch {p.id}", edit_id=str(p.mistake_id)) for p in accepted]
    stored = patchfile.concat(parts, config.hidden_size)
    same_bits = all(
        _bits(a) == _bits(b) and a.dtype == b.dtype
        for a, b in zip(
            (published.keys, published.biases, published.values),
            (stored.keys, stored.biases, stored.values),
            strict=True,
        )
    )
    ids_equal = v.patch_ids == [p.id for p in accepted]
    return {
        "version": number,
        "neurons": published.n,
        "patch_ids_equal": ids_equal,
        "edit_ids_equal": published.edit_ids == stored.edit_ids,
        "equal": bool(same_bits and ids_equal and published.edit_ids == stored.edit_ids),
    }


# ---------------------------------------------------------------------------- report


def ok_of(report: dict[str, Any]) -> bool:
    """Every invariant held and every fault that ran was recovered from."""
    t = report.get("totals") or {}
    faults = report.get("faults", [])
    return bool(
        t
        and t["lost"] == 0
        and t["duplicates"] == 0
        and t["duplicate_neurons"] == 0
        and t["left_open"] == 0
        and t["stored_not_sent"] == 0
        and t["stored"] == t["valid"]
        and t["dead_letters_as_expected"]
        and t["rejected_as_expected"]
        and t["neurons_equal_to_uninterrupted"]
        and t["published"]["equal"]
        and t["latest_failures"] == 0
        and t["final_exit"] == 0
        and report.get("drain", {}).get("drained")
        and all(
            f["recovery_s"] is not None
            and f["lost"] == 0
            and f.get("backlog_cleared_s", 0) is not None
            and not f.get("failed_checks")
            for f in faults
            if f["run"]
        )
    )


def print_report(report: dict[str, Any], out: Callable[[str], None] = print) -> None:
    cfg = report.get("config", {})
    out("")
    out(f"patchd bench chaos: {cfg.get('source', cfg.get('base'))}")
    widths = (36, 8, 8, 10, 8, 8, 9, 8, 5)
    names = ("fault", "start s", "end s", "recovery s", "ready s", "queue s", "held back", "peak lag", "lost")

    def line(cells: Sequence[str]) -> str:
        return " ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out(line(names))
    out("-" * (sum(widths) + len(widths) - 1))
    for f in report.get("faults", []):
        if not f["run"]:
            out(f"{f['name']:<36} not run: {f['notes']}")
            continue
        keys = ("started", "ended", "recovery_s", "ready_s", "backlog_cleared_s", "held_back", "peak_lag", "lost")
        out(line([f["name"], *("-" if f.get(k) is None else str(f[k]) for k in keys)]))
    t = report.get("totals")
    if t:
        out("")
        out(
            f"produced {t['produced']} ({t['valid']} valid incl. {t['recurring']} recurring, "
            f"{t['malformed']} malformed); "
            f"stored {t['stored']}, dead-lettered {t['dead_lettered']} (DLQ records {t['dlq_records']}), "
            f"lost {t['lost']}, duplicates {t['duplicates']}"
        )
        u = t["uninterrupted"]
        out(
            f"statuses {t['statuses']}; left open {t['left_open']}; {t['patches_kept']} patches kept, {t['neurons']} "
            f"neurons, duplicate neurons {t['duplicate_neurons']}"
        )
        out(
            f"equal to an uninterrupted run: {t['neurons_equal_to_uninterrupted']} ({u['compared_neurons']} neurons, "
            f"{u['verdicts']} verdicts re-run in order, {u['mismatch_count']} mismatches); published version "
            f"{t['published']['version']} equal to the store: {t['published']['equal']}"
        )
        out(
            f"LATEST checks {t['latest_checks']} (sampler {t['latest_sampler']['checks']}, watcher loads "
            f"{t['watcher']['loads']}), failures {t['latest_failures']}; daemon starts {t['daemon_starts']}, "
            f"final exit {t['final_exit']}"
        )
    out(f"result: {'OK' if report.get('ok') else 'FAILED'}" + (" (partial)" if report.get("partial") else ""))


def write_report(path: Path | None, report: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    os.replace(tmp, path)


@contextmanager
def _noop() -> Iterator[None]:
    yield


def run_chaos(opts: Options) -> dict[str, Any]:
    """The whole run; the report (also written to opts.json_path, partial on Ctrl-C / SIGTERM)."""
    report: dict[str, Any] = {
        "config": {
            "base": opts.base,
            "data": str(opts.data) if opts.data else None,
            "minutes": opts.minutes,
            "broker_down_s": opts.broker_down_s,
            "kill_every_s": list(opts.kill_every_s),
            "restart_delay_s": RESTART_DELAY_S,
            "tmpfs_mb": TMPFS_MB,
            "seed": opts.seed,
            "machine": machine_facts(),
        },
        "faults": [],
        "partial": True,
    }
    # the bench's own Kafka clients (producer, DLQ reader) log every refused connection while the
    # broker is away: that is the fault, not news
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    chaos = Chaos(opts, report)
    with ExitStack() as stack, interruptible() if threading.current_thread() is threading.main_thread() else _noop():
        stack.callback(chaos.remove_work_dir)  # first in, so last out: after the services that live in it
        try:
            chaos.setup(stack)
            stack.callback(chaos.close)
            report["config"].update(
                source=chaos.source.description,
                claims=len(chaos.source.claims),
                events=len(chaos.planned),
                storage_root_tmpfs=chaos.mounted,
            )
            chaos.start()
            faults = (chaos.broker_down, chaos.postgres_restart, chaos.storage_full, chaos.kills, chaos.watcher_kill)
            for fault in faults:
                report["current"] = fault.__name__
                report["faults"].append(fault())
                report.pop("current")
                write_report(opts.json_path, report)
                if chaos.daemon.fatal:
                    raise RuntimeError(chaos.daemon.fatal)
                time.sleep(STEADY_S)
            report["drain"] = chaos.drain()
            report["totals"] = chaos.finish()
            report["partial"] = False
            report["ok"] = ok_of(report)
            chaos.remove_work = report["ok"] and not opts.keep and opts.work is None
        except KeyboardInterrupt:
            chaos.say("interrupted: writing the partial report")
            report["interrupted"] = True
        except Exception as exc:
            report["error"] = f"{type(exc).__name__}: {exc}"
            chaos.say(f"the run failed: {report['error']}")
            raise
        finally:
            report["seconds"] = round(_now() - chaos.t0, 1)
            report["load_average_1m_end"] = round(os.getloadavg()[0], 2)  # another run beside it shows here
            report.setdefault("ok", False)
            write_report(opts.json_path, report)
    return report


if __name__ == "__main__" and sys.argv[1:2] == ["watcher"]:
    sys.exit(watcher_main(sys.argv[2:]))
