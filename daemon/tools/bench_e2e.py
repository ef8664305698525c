"""`patchd bench e2e`: from a correction produced to Kafka until a downstream watcher serves the fix.

Two processes, as deployed: `patchd run` (a child process) consumes, patches and publishes; this
process is the downstream service, a CheckpointWatcher polling LATEST on the same storage root.
Each storage medium asked for (`file`: a local directory; `s3`: a bucket on the real S3 server
that deploy/s3/server.sh starts) gets its own daemon and watcher, one after the other, on one
broker, so the figures of both sit side by side from one run. On S3 the watcher's requests while
idle are counted too.
Corrections are real FEVER claims the base gets wrong, sent one at a time: each is produced
(acks=all), then the clock runs until the watcher has swapped in a version whose model gives the
corrected label. The next one goes out `gap` seconds after that (default: publish.interval_s),
so each correction meets an idle publisher: this is the latency of one fix, not of a queue.

Also measured: the size (per file) of a version with 1,000 patches of this base's width, how long
publishing it takes, and how long a downstream load_latest of it takes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from daemon.logs import get_logger
from daemon.tools.bench_daemon import machine_facts
from daemon.tools.broker import broker, create_topics
from patching.eval.metrics import percentile

log = get_logger(__name__)

# a correction not served by then is counted as a timeout (a retried gate can take ~10 s on a CPU)
SERVE_TIMEOUT_S = 120.0
# the daemon's start-up: base, memory M and held-out caches, Kafka group join
STARTUP_TIMEOUT_S = 900.0
# how often the mistake's status is looked up while waiting (gate rejected / already fixed end the wait)
STATUS_EVERY_S = 1.0
# spare wrong claims, for corrections the served model already gets right when their turn comes
SPARE = 30


def run_e2e_bench(
    corrections: int = 100,
    base: str = "fever-minilm",
    bootstrap: str | None = None,
    publish_interval: float = 5.0,
    poll_interval: float = 0.5,
    gap: float | None = None,
    listen: bool = False,
    version_patches: int = 1000,
    storages: tuple[str, ...] = ("file",),
    idle_s: float = 60.0,
) -> dict[str, Any]:
    from daemon.tools.s3server import BUCKET, s3_server
    from patching.bases.datasets import load_task
    from patching.bases.load import load_base
    from patching.bases.tasks import TaskAdapter

    lb = load_base(base)
    wrong = TaskAdapter(lb).mistakes(load_task("fever").edit, limit=corrections + 1 + SPARE, progress=False)
    print(f"{len(wrong)} fever claims {base} gets wrong", flush=True)
    gap = publish_interval if gap is None else gap
    runs: dict[str, dict[str, Any]] = {}
    with broker(bootstrap) as address, ExitStack() as stack:
        server = stack.enter_context(s3_server()) if "s3" in storages else None
        for medium in storages:
            with tempfile.TemporaryDirectory(prefix="patchd-bench-e2e-") as tmp:
                state = Path(tmp)
                if medium == "file" or server is None:
                    storage_env = {"PATCHD_STORAGE_ROOT": str(state / "checkpoints")}
                else:
                    storage_env = {
                        "PATCHD_STORAGE_ROOT": f"s3://{BUCKET}/bench-e2e-{uuid.uuid4().hex[:8]}",
                        "PATCHD_STORAGE_CACHE_DIR": str(state / "s3-cache"),
                        **server.settings_env(),
                    }
                print(f"--- storage {medium}: {storage_env['PATCHD_STORAGE_ROOT']}", flush=True)
                topic = f"bench-e2e-{uuid.uuid4().hex[:8]}"
                create_topics(address, topic)
                env = {**_daemon_env(address, topic, state, base, publish_interval), **storage_env}
                with (state / "daemon.log").open("w") as daemon_log:
                    daemon = subprocess.Popen(
                        [sys.executable, "-m", "daemon", "run"], env=env, stdout=daemon_log, stderr=subprocess.STDOUT
                    )
                    try:
                        result = _measure(
                            lb, wrong, corrections, address, topic, env, poll_interval, gap, listen, idle_s
                        )
                    finally:
                        daemon.send_signal(signal.SIGTERM)
                        try:
                            daemon.wait(timeout=120)
                        except subprocess.TimeoutExpired:
                            daemon.kill()
                result["final_version"] = _final_version(env, base)
                result["version_with_patches"] = measure_version_size(version_patches, lb, env)
                runs[medium] = result
    return {
        "storage": runs,
        "base": base,
        "publish_interval_s": publish_interval,
        "poll_interval_s": poll_interval,
        "gap_s": gap,
        "watcher": "kafka releases + LATEST poll" if listen else "LATEST poll",
        "s3_server": "s3proxy 2.6.0 (filesystem-nio2) on 127.0.0.1, deploy/s3/server.sh" if "s3" in storages else None,
        "machine": machine_facts(),
    }


def _daemon_env(address: str, topic: str, state: Path, base: str, publish_interval: float) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_WAIT_POLICY": "PASSIVE",
        "HOME": os.environ.get("HOME", str(state)),
        "PATCHD_STATE_DIR": str(state / "state"),
        "PATCHD_MODEL_NAME": base,
        "PATCHD_KAFKA_BOOTSTRAP_SERVERS": address,
        "PATCHD_KAFKA_TOPIC": topic,
        "PATCHD_PUBLISH_INTERVAL_S": str(publish_interval),
        "PATCHD_HEALTH_PORT": "0",
        "PATCHD_LOG_LEVEL": "INFO",
        "PATCHD_DEVICE": os.environ.get("PATCHD_DEVICE", "auto"),
    }


def _measure(
    lb: Any,
    wrong: list[Any],
    corrections: int,
    address: str,
    topic: str,
    env: dict[str, str],
    poll_interval: float,
    gap: float,
    listen: bool,
    idle_s: float,
) -> dict[str, Any]:
    from kafka import KafkaProducer

    from daemon.publisher import storage_of
    from daemon.settings import load_settings
    from memory.fingerprint import fingerprint
    from memory.store import Store
    from patching.bases.tasks import TaskAdapter
    from patching.client import CheckpointWatcher, KafkaReleases

    settings = load_settings(None, env)
    assert settings.storage.root is not None  # resolved by load_settings
    swapped = threading.Event()
    watcher = CheckpointWatcher(
        storage_of(settings),
        lb.name,
        lb.directory,
        interval=poll_interval,
        on_swap=lambda _: swapped.set(),
        releases=KafkaReleases(address, f"{topic}.releases") if listen else None,
    ).start()
    producer = KafkaProducer(bootstrap_servers=address, acks="all", linger_ms=0)
    rng = random.Random(0)

    def predict(model: Any, text: str) -> str:
        return TaskAdapter(replace(lb, model=model)).predict([text])[0]

    rows: list[dict[str, Any]] = []
    outcomes: dict[str, int] = {}
    startup_s = None
    try:
        t_start = time.time()
        queue = list(wrong)
        while queue and len(rows) < corrections + 1:  # the first one is the warm-up: the daemon starting
            example = queue.pop(0)
            current = watcher.current()
            if predict(current.model, example.input) == example.target:
                outcomes["already_right_when_due"] = outcomes.get("already_right_when_due", 0) + 1
                continue
            event = {"id": f"e2e-{len(rows)}", "model": lb.name, "input": example.input, "target": example.target}
            t0 = time.time()
            producer.send(topic, value=json.dumps(event).encode()).get(timeout=30)
            outcome, served_at, loaded = _wait_served(
                watcher,
                swapped,
                predict,
                example,
                current.version,
                settings,
                fingerprint,
                Store,
                STARTUP_TIMEOUT_S if startup_s is None else SERVE_TIMEOUT_S,
            )
            if startup_s is None:
                startup_s = time.time() - t_start
                print(f"daemon ready and first fix served after {startup_s:.1f}s", flush=True)
                rows.append({"warmup": True, "outcome": outcome})
                time.sleep(gap)
                continue
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            row: dict[str, Any] = {"outcome": outcome}
            if served_at is not None and loaded is not None:
                row.update(latency_s=round(served_at - t0, 4), version=loaded.version)
                created = loaded.manifest.get("created_at")
                if created:
                    from datetime import datetime

                    row["publish_started_s"] = round(datetime.fromisoformat(created).timestamp() - t0, 4)
                print(f"{len(rows):3d}: served in {row['latency_s']:.2f}s", flush=True)
                time.sleep(gap + rng.uniform(0, poll_interval))  # an idle publisher for the next one
            else:
                print(f"{len(rows):3d}: {outcome}", flush=True)
            rows.append(row)
        idle = _idle_requests(watcher, idle_s)
    finally:
        producer.close()
        watcher.stop()
    measured = [r for r in rows if "latency_s" in r]
    latencies = [r["latency_s"] for r in measured]
    to_publish = [r["publish_started_s"] for r in measured if "publish_started_s" in r]
    served_after_publish = [r["latency_s"] - r["publish_started_s"] for r in measured if "publish_started_s" in r]
    return {
        "corrections": corrections,
        "served": len(latencies),
        "outcomes": outcomes,
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p95_s": round(cast(float, percentile(latencies, 0.95)), 3) if latencies else None,
        "mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
        "min_s": round(min(latencies), 3) if latencies else None,
        "max_s": round(max(latencies), 3) if latencies else None,
        # correction produced -> the publish of its version began (consume, store, patch, gate, schedule)
        "to_publish_p50_s": round(statistics.median(to_publish), 3) if to_publish else None,
        # publish began -> served downstream (write, fsync, LATEST, poll wait, verify, build, swap)
        "publish_to_served_p50_s": round(statistics.median(served_after_publish), 3) if served_after_publish else None,
        "daemon_startup_s": round(startup_s or 0.0, 1),
        "watcher_swaps": watcher.swaps,
        "watcher_errors": watcher.errors,
        "idle_watcher": idle,
        "rows": rows,
    }


def _idle_requests(watcher: Any, idle_s: float) -> dict[str, Any] | None:
    """Requests the watcher sends to an object store in `idle_s` seconds without a publish (per minute)."""
    requests = getattr(watcher.storage, "requests", None)
    if requests is None or idle_s <= 0:
        return None
    print(f"counting an idle watcher's requests for {idle_s:.0f}s ...", flush=True)
    requests.clear()
    swaps = watcher.swaps
    time.sleep(idle_s)
    counted = dict(requests)
    return {
        "seconds": idle_s,
        "requests": counted,
        "per_minute": round(sum(counted.values()) * 60.0 / idle_s, 1),
        "swaps": watcher.swaps - swaps,
    }


def _wait_served(
    watcher: Any,
    swapped: threading.Event,
    predict: Any,
    example: Any,
    before: int | None,
    settings: Any,
    fingerprint: Any,
    store_cls: Any,
    timeout_s: float,
) -> tuple[str, float | None, Any]:
    """Wait until a swapped-in version gives the target: ("served", when it became servable, Loaded);
    or the daemon decided otherwise (gate_rejected, already_fixed, failed), or the time ran out."""
    deadline = time.time() + timeout_s
    seen = before
    status_at = time.time()
    key = fingerprint(settings.model.name, example.input)
    while time.time() < deadline:
        swapped.wait(0.05)
        swapped.clear()
        loaded = watcher.current()
        if loaded.version != seen:
            seen = loaded.version
            if predict(loaded.model, example.input) == example.target:
                return "served", loaded.loaded_at, loaded
        if time.time() - status_at > STATUS_EVERY_S:
            status_at = time.time()
            status = _status(settings, key, store_cls)
            if status in ("gate_rejected", "already_fixed", "failed", "conflicting"):
                return status, None, None
    return "timeout", None, None


def _status(settings: Any, key: str, store_cls: Any) -> str | None:
    try:
        with store_cls.open(settings.database.url, upgrade=False) as store:
            mistake = store.find_mistake(settings.model.name, key)
    except Exception:  # noqa: BLE001 - the daemon may not have created the database yet
        return None
    return None if mistake is None else str(mistake.status)


def _final_version(env: dict[str, str], model: str) -> dict[str, Any] | None:
    from daemon.publisher import storage_of
    from daemon.settings import load_settings
    from patching.checkpoint import read_verified

    storage = storage_of(load_settings(None, env))
    number = storage.latest(model)
    if number is None:
        return None
    v = read_verified(storage, model, number)
    return {"version": number, "edits": len(v.edits), "neurons": v.manifest["neurons"], "bytes": v.size}


# ---------------------------------------------------------------------------- size of a version


def measure_version_size(patches: int, lb: Any, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Publish `patches` one-neuron patches of the base's width (random weights: the size depends only
    on the shapes) into a scratch store and storage (a scratch directory, or the storage the
    PATCHD_STORAGE_* variables in `env` name, under its own model name); sizes per file, publish
    and load times."""
    import torch

    from daemon.publisher import BaseInfo, Publisher
    from memory.records import PatchIn, ReportIn
    from memory.store import Store
    from patching import patchfile
    from patching.arch import locate
    from patching.checkpoint import MANIFEST_FILE, read_verified
    from patching.client import load_latest
    from patching.loading import base_identity
    from patching.storage import FileStorage, Storage

    site = locate(lb.model)
    d = int(site.hidden_size)
    rng = torch.Generator().manual_seed(0)
    gate = {"changed": 0, "regressed": 0, "retention_failed": 0, "attempts": 1, "heldout_active": 0.0035}
    with tempfile.TemporaryDirectory(prefix="patchd-bench-size-") as tmp, Store.open(f"sqlite:///{tmp}/s.db") as store:
        model = "size"
        reports = [
            ReportIn(f"s{i}", model, f"{i:064x}", f"input {i}", "SUPPORTS", b"{}", "t", 0, i) for i in range(patches)
        ]
        store.record_batch(reports)
        for _ in range(patches):
            mistake = store.next_mistake(model, claim=True)
            assert mistake is not None
            keys, biases, values = (torch.randn(shape, generator=rng) for shape in ((1, d), (1,), (1, d)))
            blob = patchfile.encode(keys, biases, values, [str(mistake.id)])
            store.add_patch(mistake.id, PatchIn(blob, 1, site.layer_index, "relu", 10, 0.05, dict(gate), True))
        if env is not None and "://" in env.get("PATCHD_STORAGE_ROOT", ""):
            from daemon.publisher import storage_of
            from daemon.settings import load_settings

            storage: Storage = storage_of(load_settings(None, env))
        else:
            storage = FileStorage(Path(tmp) / "checkpoints")
        info = BaseInfo(
            base_identity(lb.directory), lb.name, str(lb.model.config.model_type), d, site.layer_index, "relu"
        )
        published = Publisher(model, store, storage, info).publish_if_changed()
        assert published is not None
        v = read_verified(storage, model, published.number)
        t0 = time.perf_counter()
        loaded = load_latest(storage, model, lb.directory)
        load_s = time.perf_counter() - t0
        assert loaded.version == published.number
        files = {name: len(data) for name, data in v.files.items()}
        files[MANIFEST_FILE] = v.manifest_size
    return {
        "patches": patches,
        "neurons": published.neurons,
        "hidden_size": d,
        "bytes": files,
        "total_bytes": v.size,
        "publish_s": round(published.seconds, 3),
        "load_latest_s": round(load_s, 3),
    }
