"""`patchd demo`: the quickstart's scripted core, a daemon fixing real mistakes end to end.

The parts run as they are deployed, each its own process:

    this process      finds FEVER claims the base gets wrong, then plays the downstream service:
                      it loads what was published with patching.client.load_latest and compares
    a producer        `python -m daemon.tools.demo produce`: the users' application sending corrections
    patchd run        the daemon on embedded defaults: SQLite and checkpoints under the state dir
    a Kafka broker    deploy/kafka/broker.sh on free ports, data under the state dir (or --bootstrap)

The stream holds one correction per claim, a few recurring reports of the same claims by other
users (absorbed into the existing mistake: no second neuron), one re-delivered event (same id:
stored once) and a few malformed events (dead-lettered with their reason). The demo waits until
the daemon has handled everything and published it, stops the daemon (warm stop) and the broker,
and prints what happened (daemon/tools/demo_report.py). Every run starts from a fresh state directory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.tools.broker import BROKER_SH, broker, create_topics, free_ports

Out = Callable[[str], None]

# the size: enough for several published versions, a few minutes on 2 CPU cores
DEFAULT_CORRECTIONS = 40
# one claim in this many is reported again later by other users
RECUR_EVERY = 8
# seconds between two events: a stream that lasts about half a minute, so that several versions
# are published while it arrives (publish.interval_s is 5 s)
PRODUCE_GAP_S = 0.5
# the first start on a CPU builds the memory set M of 10,066 claims (~150 s on 2 busy cores)
READY_TIMEOUT_S = 900.0
# everything handled and published: start-up is over by then, a retried gate costs ~10 s per claim
HANDLED_TIMEOUT_S = 300.0
HANDLED_PER_CORRECTION_S = 30.0
# a warm stop finishes the current neuron (retries included)
STOP_TIMEOUT_S = 120.0
# FEVER test claims whose predictions are compared before and after: what else changed
OTHER_CLAIMS = 500
MARKER = ".patchd-demo"  # a state dir holding it may be wiped by the next run; any other is left alone
DAEMON_PID = "daemon.pid"
# PATCHD_* settings variables are not inherited: the demo runs on embedded defaults, never on a
# database or storage an operator configured in this shell
SETTINGS_PREFIXES = tuple(
    f"PATCHD_{s.upper()}_"
    for s in ("model", "kafka", "database", "state", "storage", "trainer", "gate", "policy", "publish", "health", "log")
)


class DemoError(RuntimeError):
    """The demo could not run (daemon died, nothing handled in time, a state dir that is not the demo's)."""


def default_state_dir() -> Path:
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "patchd-demo"


# ---------------------------------------------------------------------------- the stream


@dataclass
class Stream:
    values: list[bytes]  # in production order
    claims: list[Any]  # patching.bases.datasets.Example: the distinct claims corrected, first report first
    recurring: int = 0  # later reports of a claim by other users (new event ids)
    resent: int = 0  # exact re-deliveries (an event id seen before)
    malformed: Counter[str] = field(default_factory=Counter)  # DLQ reason -> count

    @property
    def valid_reports(self) -> int:
        return len(self.claims) + self.recurring


def build_stream(model: str, claims: list[Any], seed: int = 0, run: str = "") -> Stream:
    """One correction per claim, recurring reports, one re-delivery and four malformed events."""
    rng = random.Random(seed)
    run = run or uuid.uuid4().hex[:8]
    stream = Stream(values=[], claims=list(claims))

    def event(i: str, text: str, target: Any, reporter: str) -> dict[str, Any]:
        return {"id": f"demo-{run}-{i}", "model": model, "input": text, "target": target, "reporter": reporter}

    firsts = [event(str(i), c.input, c.target, f"user{rng.randrange(1000):03d}") for i, c in enumerate(claims)]
    events: list[dict[str, Any] | bytes] = list(firsts)
    for k, i in enumerate(range(0, len(claims), RECUR_EVERY)):
        for r in range(1 + k % 2):  # one or two other users report the same claim, spelled a bit differently
            text = f" {claims[i].input}" if r else claims[i].input.replace(" ", "  ", 1)
            at = rng.randint(events.index(firsts[i]) + 1, len(events))
            events.insert(at, event(f"{i}-again{r}", text, claims[i].target, f"other{k}-{r}"))
            stream.recurring += 1
    if claims:  # a producer retry: the same event, same id, delivered twice
        events.insert(rng.randint(events.index(firsts[0]) + 1, len(events)), firsts[0])
        stream.resent = 1
    some = claims[0].input if claims else "a claim"
    bad: list[tuple[str, dict[str, Any] | bytes]] = [
        (
            "bad_json",
            b'{"id": "demo-%s-bad-json", "model": "%s", "input": "unterminated' % (run.encode(), model.encode()),
        ),
        ("missing_field", {"id": f"demo-{run}-no-target", "model": model, "input": some}),
        ("unknown_label", event("nei", some, "NOT ENOUGH INFO", "user-nei")),
        ("wrong_type", event("int-label", some, 1, "user-int")),
    ]
    for reason, value in bad:
        events.insert(rng.randint(0, len(events)), value)
        stream.malformed[reason] += 1
    stream.values = [e if isinstance(e, bytes) else json.dumps(e).encode() for e in events]
    return stream


def produce_main(argv: list[str] | None = None) -> int:
    """`python -m daemon.tools.demo produce`: send the events of a JSON-lines file, one every --gap seconds."""
    parser = argparse.ArgumentParser(prog="python -m daemon.tools.demo produce")
    parser.add_argument("events", type=Path, help="one JSON string per line: the raw value of an event")
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--gap", type=float, default=PRODUCE_GAP_S)
    args = parser.parse_args(argv)
    from kafka import KafkaProducer

    values = [json.loads(line).encode() for line in args.events.read_text().splitlines() if line]
    parent = os.getppid()
    producer = KafkaProducer(bootstrap_servers=args.bootstrap, acks="all", linger_ms=0, max_block_ms=30_000)
    try:
        for value in values:
            if os.getppid() != parent:  # the demo is gone (killed): so is its broker, stop sending
                print("producer: the demo exited; stopping", file=sys.stderr)
                return 1
            producer.send(args.topic, value=value)
            time.sleep(args.gap)
        producer.flush(timeout=60)
    finally:
        producer.close(timeout=5)
    print(f"producer: sent {len(values)} events to {args.topic}", flush=True)
    return 0


# ---------------------------------------------------------------------------- the run


@dataclass
class Demo:
    """Where this run lives; filled in as it goes."""

    state_dir: Path
    model: str
    base: str
    env: dict[str, str] = field(default_factory=dict)  # the daemon's environment
    settings: Any = None
    bootstrap: str = ""
    timings: dict[str, float] = field(default_factory=dict)


def run_demo(
    corrections: int = DEFAULT_CORRECTIONS,
    state_dir: Path | None = None,
    bootstrap: str | None = None,
    *,
    base: str = "fever-minilm",
    model: str | None = None,
    claims: list[Any] | None = None,
    others: list[str] | None = None,
    env: dict[str, str] | None = None,
    gap: float = PRODUCE_GAP_S,
    out: Out = print,
) -> dict[str, Any]:
    """The whole demo; returns what the summary shows (daemon/tools/demo_report.py prints it).

    `claims` (Examples the base gets wrong), `others` (inputs to compare before/after) and `env`
    (extra PATCHD_* settings for the daemon) replace the FEVER defaults, for the tiny test base;
    `gap` is the producer's pause between two events.
    """
    import transformers

    from daemon.tools.demo_report import collect, downstream, print_summary
    from patching.bases.load import load_base
    from patching.bases.tasks import TaskAdapter

    transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per load_latest
    t0 = time.perf_counter()
    demo = Demo(fresh_state_dir(state_dir or default_state_dir()), model or base, base)
    lb = load_base(base)
    adapter = TaskAdapter(lb)
    if claims is None or others is None:
        from patching.bases.datasets import load_task

        fever = load_task("fever")
        claims = claims if claims is not None else adapter.mistakes(fever.edit, limit=corrections, progress=False)
        others = others if others is not None else [e.input for e in fever.test[:OTHER_CLAIMS]]
    claims = claims[:corrections]
    out(f"found {len(claims)} FEVER claims that {base} gets wrong ({time.perf_counter() - t0:.1f}s)")
    stream = build_stream(demo.model, claims, run=uuid.uuid4().hex[:8])
    with broker(bootstrap, demo.state_dir / "kafka") as address:
        demo.bootstrap = address
        topic = "corrections" if bootstrap is None else f"corrections-demo-{uuid.uuid4().hex[:8]}"
        create_topics(address, topic)  # also <topic>.dlq and <topic>.releases
        demo.env = daemon_env(demo, topic, env or {})
        from daemon.settings import load_settings

        demo.settings = load_settings(None, demo.env)
        before = downstream(demo, lb, [c.input for c in claims] + others, out)
        with running_daemon(demo, out):
            started = time.perf_counter()
            produce(demo, stream, gap, out)
            wait_handled(demo, stream, out)
            demo.timings["handled_s"] = round(time.perf_counter() - started, 1)
            out(f"all handled and published {demo.timings['handled_s']}s after the first event was sent")
        result = collect(demo, stream, lb, before, others, out)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (demo.state_dir / "demo.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_summary(result, out)
    return result


def fresh_state_dir(path: Path) -> Path:
    """An empty state dir for this run; a previous demo's is wiped, anything else refused."""
    path = path.expanduser().resolve()
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).exists():
            raise DemoError(f"{path} is not empty and was not made by `patchd demo`: choose another --state-dir")
        stop_leftovers(path)
        import shutil

        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("made by `patchd demo`; the next run deletes this directory\n")
    return path


def stop_leftovers(path: Path) -> None:
    """A killed demo may have left its daemon or broker running on this state dir: stop them."""
    pid_file = path / DAEMON_PID
    if pid_file.exists():
        pid = int(pid_file.read_text().strip() or 0)
        cmdline = Path(f"/proc/{pid}/cmdline")
        if pid > 0 and cmdline.exists() and b"daemon\x00run" in cmdline.read_bytes():
            os.kill(pid, signal.SIGTERM)
            for _ in range(int(STOP_TIMEOUT_S * 10)):
                if not cmdline.exists():
                    break
                time.sleep(0.1)
    if (path / "kafka").is_dir():
        env = {**os.environ, "KAFKA_STATE_DIR": str(path / "kafka")}
        subprocess.run(["bash", str(BROKER_SH), "stop"], env=env, capture_output=True, timeout=180)


def daemon_env(demo: Demo, topic: str, extra: dict[str, str]) -> dict[str, str]:
    """Embedded defaults plus only what this run needs: its state dir, its broker, a free health port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTINGS_PREFIXES)}
    env.update(
        OMP_WAIT_POLICY="PASSIVE",  # before torch loads: idle OpenMP threads must not spin on 2 cores
        PATCHD_STATE_DIR=str(demo.state_dir),
        PATCHD_KAFKA_BOOTSTRAP_SERVERS=demo.bootstrap,
        PATCHD_HEALTH_PORT=str(free_ports(1)[0]),
    )
    if topic != "corrections":
        env["PATCHD_KAFKA_TOPIC"] = topic
    if demo.model != demo.base:
        env.update(PATCHD_MODEL_NAME=demo.model, PATCHD_MODEL_BASE=demo.base)
    env.update(extra)
    return env


@contextmanager
def running_daemon(demo: Demo, out: Out) -> Iterator[subprocess.Popen[bytes]]:
    """`patchd run` as a child process until the block ends, then a warm stop (SIGTERM)."""
    port = demo.env["PATCHD_HEALTH_PORT"]
    shown = {k: v for k, v in demo.env.items() if k.startswith("PATCHD_") and os.environ.get(k) != v}
    out("starting the daemon: " + " ".join(f"{k}={v}" for k, v in sorted(shown.items())) + " patchd run")
    t0 = time.perf_counter()
    with (demo.state_dir / "daemon.log").open("wb") as log:
        # its own session: a Ctrl-C reaches this process only, which then stops the daemon warm
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run"],
            env=demo.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    (demo.state_dir / DAEMON_PID).write_text(f"{proc.pid}\n")
    try:
        _wait(lambda: _ready(port), proc, demo, READY_TIMEOUT_S, "the daemon's /readyz")
        demo.timings["daemon_ready_s"] = round(time.perf_counter() - t0, 1)
        out(f"daemon ready after {demo.timings['daemon_ready_s']}s (http://127.0.0.1:{port}/readyz)")
        yield proc
    finally:
        if proc.poll() is None:
            out("stopping the daemon (warm stop: SIGTERM) ...")
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        (demo.state_dir / DAEMON_PID).unlink(missing_ok=True)
        demo.timings["daemon_exit_code"] = proc.returncode


def _ready(port: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            status: int = response.status
            return status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait(done: Callable[[], bool], proc: subprocess.Popen[bytes], demo: Demo, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if proc.poll() is not None:
            tail = (demo.state_dir / "daemon.log").read_text(errors="replace").splitlines()[-15:]
            raise DemoError(f"the daemon exited with {proc.returncode} while waiting for {what}:\n" + "\n".join(tail))
        if time.monotonic() > deadline:
            raise DemoError(f"no {what} within {timeout_s:.0f}s (log: {demo.state_dir / 'daemon.log'})")
        time.sleep(0.5)


def produce(demo: Demo, stream: Stream, gap: float, out: Out) -> None:
    """The events go to Kafka from a separate process, as a client application would send them."""
    path = demo.state_dir / "events.jsonl"
    path.write_text("".join(json.dumps(v.decode()) + "\n" for v in stream.values))
    out(
        f"producing {len(stream.values)} events: {len(stream.claims)} corrections, {stream.recurring} recurring "
        f"reports by other users, {stream.resent} re-delivery, {sum(stream.malformed.values())} malformed"
    )
    topic = demo.settings.kafka.topic
    cmd = [sys.executable, "-m", "daemon.tools.demo", "produce", str(path), "--bootstrap", demo.bootstrap]
    cmd += ["--topic", topic, "--gap", str(gap)]
    done = subprocess.run(cmd, env=demo.env, capture_output=True, text=True, timeout=120 + gap * len(stream.values))
    if done.returncode != 0:
        raise DemoError(f"the producer failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    out(done.stdout.strip())


def wait_handled(demo: Demo, stream: Stream, out: Out) -> None:
    """Until every report is stored, every malformed event dead-lettered, the queue empty and published."""
    from memory.store import Store

    deadline = time.monotonic() + HANDLED_TIMEOUT_S + HANDLED_PER_CORRECTION_S * len(stream.claims)
    shown, shown_at = "", 0.0
    with Store.open(demo.settings.database.url, upgrade=False) as store:
        while True:
            r = store.status_summary(demo.model, demo.settings.policy.quorum).as_dict()
            latest = store.latest_version(demo.model)
            patched = {m for _, m in store.accepted_patch_ids(demo.model)}
            published = patched <= set(latest.edit_ids if latest else ())
            open_ = sum(r["mistakes"].get(s, 0) for s in ("reported", "queued", "patching"))
            done = {k: v for k, v in r["mistakes"].items() if v and k not in ("reported", "queued", "patching")}
            line = (
                f"  reports {r['reports']}/{stream.valid_reports}, dead-lettered {r['rejected']}/"
                f"{sum(stream.malformed.values())}, mistakes done {done or '{}'}, waiting {open_}, "
                f"last version {r['last_version'] or '-'}"
            )
            if line != shown and time.monotonic() - shown_at > 3:
                out(line)
                shown, shown_at = line, time.monotonic()
            if (
                r["reports"] >= stream.valid_reports
                and r["rejected"] >= sum(stream.malformed.values())
                and open_ == 0
                and published
            ):
                break
            if time.monotonic() > deadline:
                raise DemoError(f"the daemon did not handle every correction in time; last: {line.strip()}")
            time.sleep(0.5)


if __name__ == "__main__":
    if sys.argv[1:2] != ["produce"]:
        sys.exit("usage: python -m daemon.tools.demo produce EVENTS --bootstrap HOST:PORT --topic TOPIC")
    sys.exit(produce_main(sys.argv[2:]))
