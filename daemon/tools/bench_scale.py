"""`patchd bench scale`: one long stream of edits through the daemon's own parts, measured per window.

Every edit goes the daemon's way: a report is stored (memory/), the Worker claims the mistake and
patches it (PatchedModel: the engine and the gate on the daemon's memory and held-out sets), the
patch row is stored and the engine snapshot written every `state.snapshot_every` patches. Only
Kafka is left out of the edit loop: the stream is about what grows with the patches.

At the end of every window (default 1,000 edits) the model as it stands is measured:
- ER: every edit so far that was fixed (patched, or already right) is asked again;
- locality: the held-out claims' labels against the unpatched base's;
- inference overhead against the unpatched base on fixed batches of 1 and 16 held-out claims,
  timed side by side (alternating rounds, median), with the outputs checked equal to the dense
  layer's (every position, every neuron);
- publishing: a version is published one edit before the window ends and a watcher loads it; at
  the window's end the next version (one patch more) is published and the watcher swaps to it.
  The bytes the publish wrote and the watcher read are counted, and a cold load_latest is timed;
- restart: a real `patchd run` (a child process, on the same state directory and database, with
  a private Kafka broker) is started and timed until /readyz answers 200, then stopped.

Ctrl-C or SIGTERM stops after the current edit and writes the partial report; `--resume REPORT`
goes on from there: the model comes back as the daemon's does (snapshot, then replay).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from tqdm import tqdm

from daemon.logs import get_logger
from daemon.tools.bench_daemon import machine_facts
from daemon.tools.interrupt import interruptible
from patching.storage import FileStorage, Step, _no_step

log = get_logger(__name__)

WINDOW = 1000
# restart of the child daemon: base load, caches, snapshot, Kafka group join
READY_TIMEOUT_S = 900.0
OVERHEAD_ROUNDS = 15  # alternating base / patched rounds per batch size
REMEASURE_ROUNDS = 61  # --remeasure: a quiet machine's median, from more rounds
SAME = ("base", "edits", "window", "memory_size", "seed")  # what --resume must match


def report_path_default(base: str) -> Path:
    return Path(f"bench-scale-{base}.json")


def run_scale_bench(
    base: str,
    edits: int,
    json_path: Path,
    *,
    resume: bool = False,
    window: int = WINDOW,
    memory_size: int | None = None,
    data_dir: Path | None = None,
    seed: int = 0,
    bootstrap: str | None = None,
    restart: bool = True,
) -> dict[str, Any]:
    from daemon.tools.broker import broker
    from patching.eval.scale import SCALE_MEMORY, SCALE_TASK

    task = SCALE_TASK.get(base)
    if task is None:
        raise SystemExit(f"bench scale: --base {base!r} has no scale stream (one of {', '.join(SCALE_TASK)})")
    memory_size = SCALE_MEMORY[task] if memory_size is None else memory_size
    work = json_path.with_name(json_path.stem + ".work")
    asked = {"base": base, "edits": edits, "window": window, "memory_size": memory_size, "seed": seed}
    report: dict[str, Any]
    if resume:
        report = json.loads(json_path.read_text())
        differs = {k: (report.get(k), v) for k, v in asked.items() if report.get(k) != v}
        if differs:
            raise SystemExit(f"--resume {json_path}: another run ({differs}); use the same arguments")
        if not work.is_dir():
            raise SystemExit(f"--resume {json_path}: its work directory {work} is gone")
    else:
        if work.exists():
            raise SystemExit(f"{work} exists: --resume {json_path} to go on, or remove it for a new run")
        report = {**asked, "windows": [], "current": [], "next": 0, "device": "cpu", "partial": True}
        work.mkdir(parents=True)
    report["machine"] = machine_facts()
    report["settings_from_environment"] = _overrides()
    with broker(bootstrap, work / "kafka") if restart else _no_broker() as address, interruptible():
        try:
            # the report is rewritten after every edit, so a run killed without a chance to write it
            # (SIGKILL, out of memory) resumes at most one edit back, as one stopped by SIGTERM does
            _run(report, work, data_dir, address, save=lambda: _write(json_path, report))
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the partial report below
            log.warning("stopped: writing the partial report", next=report["next"])
        finally:
            _write(json_path, report)
    return report


def remeasure_overhead(json_path: Path, rounds: int = REMEASURE_ROUNDS) -> dict[str, Any]:
    """The overhead figures of a run's model measured again, with more alternating rounds: the model
    as a restarting daemon restores it from the run's work directory (snapshot, then replay). The
    result is kept in the report as `remeasured` (the windows keep what was measured during the run)."""
    from daemon.model import PatchedModel
    from daemon.settings import load_settings
    from memory.store import Store

    report = json.loads(json_path.read_text())
    work = json_path.with_name(json_path.stem + ".work")
    if not work.is_dir():
        raise SystemExit(f"--remeasure {json_path}: its work directory {work} is gone")
    settings = load_settings(None, _settings_env(work, report["base"], None, 0))
    assert settings.database.url is not None
    model = PatchedModel.load(settings)
    with Store.open(settings.database.url) as store:
        model.rebuild(store)
    heldout = [json.loads(line)["input"] for line in (work / "heldout.jsonl").read_text().splitlines()]
    out = {
        "edits_done": report.get("edits_done"),
        "neurons": model.patcher.wrapper.n,
        "rounds": rounds,
        **_overhead(model, heldout, rounds),
        "load_average": os.getloadavg(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    report["remeasured"] = out
    _write(json_path, report)
    return out


@contextmanager
def _no_broker() -> Iterator[str | None]:
    yield None


def _write(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- the run


def _overrides() -> dict[str, str]:
    """PATCHD_* settings from the environment (e.g. PATCHD_GATE_RETRIES=4): the run's daemon parts
    and its restarted `patchd run` use them, as a deployment would; the report lists them."""
    return {k: v for k, v in os.environ.items() if k.startswith("PATCHD_") and k != "PATCHD_CACHE_DIR"}


def _settings_env(work: Path, base: str, address: str | None, health_port: int) -> dict[str, str]:
    return {
        **_overrides(),
        "PATCHD_STATE_DIR": str(work / "state"),
        "PATCHD_MODEL_NAME": base,
        "PATCHD_MODEL_MEMORY_FILE": str(work / "memory.jsonl"),
        "PATCHD_MODEL_HELDOUT_FILE": str(work / "heldout.jsonl"),
        "PATCHD_KAFKA_BOOTSTRAP_SERVERS": address or "127.0.0.1:1",
        "PATCHD_KAFKA_TOPIC": f"bench-scale-{uuid.uuid4().hex[:8]}",
        "PATCHD_HEALTH_PORT": str(health_port),
        "PATCHD_DEVICE": "cpu",
        "PATCHD_LOG_LEVEL": "WARNING",
    }


def _run(
    report: dict[str, Any], work: Path, data_dir: Path | None, address: str | None, save: Callable[[], None]
) -> None:
    from daemon.model import PatchedModel
    from daemon.publisher import BaseInfo, Publisher
    from daemon.settings import load_settings
    from daemon.worker import Worker
    from memory.store import Store
    from patching.bases.load import load_base
    from patching.bases.tasks import TaskAdapter
    from patching.eval.scale import SCALE_TASK, counterfact_stream, fever_stream, plot_scale, summarize_window

    base, n, window = report["base"], report["edits"], report["window"]
    stream_file = work / "stream.json"
    if not stream_file.exists():
        t0 = time.perf_counter()
        if SCALE_TASK[base] == "fever":
            lb = load_base(base)
            stream = fever_stream(
                lambda xs: TaskAdapter(lb).predict(xs, progress=True),
                n,
                report["memory_size"],
                data_dir,
                report["seed"],
            )
            del lb
        else:
            stream = counterfact_stream(n, report["memory_size"], data_dir, report["seed"])
        for name, inputs in (("memory", stream.memory), ("heldout", stream.heldout)):
            (work / f"{name}.jsonl").write_text("".join(json.dumps({"input": x}) + "\n" for x in inputs))
        edits = [[e.input, e.target, e.kind] for e in stream.edits]
        stream_file.write_text(json.dumps({"facts": stream.facts, "edits": edits}))
        print(f"stream of {len(edits)} edits built in {time.perf_counter() - t0:.0f}s: {stream.facts}", flush=True)
    saved = json.loads(stream_file.read_text())
    report["stream"] = saved["facts"]
    stream_edits: list[list[str]] = saved["edits"]
    if len(stream_edits) < n:
        print(f"the real data runs out after {len(stream_edits)} edits (asked {n}): stopping there", flush=True)
    total = min(n, len(stream_edits))

    env = _settings_env(work, base, address, 0)
    settings = load_settings(None, env)
    assert settings.database.url is not None
    # runs written before [policy] context_prefixes / context_chat_copies existed trained without them
    earlier = {key: report.get("settings", {}).get(key, 0) for key in ("context_prefixes", "context_chat_copies")}
    report["settings"] = {
        "gate": asdict(settings.gate),
        "trainer": asdict(settings.trainer),
        "snapshot_every": settings.state.snapshot_every,
        "policy_quorum": settings.policy.quorum,
    }
    t0 = time.perf_counter()
    model = PatchedModel.load(settings)
    now = {"context_prefixes": len(model.prefixes), "context_chat_copies": model.chat_copies}
    for key, value in now.items():
        if report["next"] and value != earlier[key]:
            report["settings"].update(earlier)  # the report stays the run's
            raise SystemExit(
                f"--resume: the run's patches trained with {key} = {earlier[key]}, this one would use {value}: "
                f"set PATCHD_POLICY_{key.upper()}={earlier[key]} to go on"
            )
    report["settings"].update(now)
    with Store.open(settings.database.url) as store:
        rebuilt = model.rebuild(store)
        print(
            f"model ready in {time.perf_counter() - t0:.1f}s (restored {rebuilt.restored}, "
            f"replayed {rebuilt.replayed} patches)",
            flush=True,
        )
        worker = Worker(store, model, settings.policy, work_allowed=_set(), ingest_done=_set())
        last: dict[str, Any] = {}
        propose = model.propose

        def spy(mistake: Any, equivalents: Sequence[str] = ()) -> Any:
            proposal = propose(mistake, equivalents)
            last["proposal"] = proposal
            return proposal

        model.propose = spy  # type: ignore[method-assign]
        storage = _CountingStorage(Path(settings.storage.root or work / "checkpoints"))
        publisher = Publisher(base, store, storage, BaseInfo.of_model(model))
        heldout = [json.loads(line)["input"] for line in (work / "heldout.jsonl").read_text().splitlines()]
        base_labels = _base_predictions(work, model, heldout)
        downstream = _Downstream(storage.root, base, model.base.directory)
        i = report["next"]
        bar = tqdm(total=total, initial=i, desc="bench scale", unit="edit", dynamic_ncols=True)
        while True:
            # a window ends here; a run stopped while measuring it measures it again on --resume
            if report["current"] and (i % window == 0 or i == total):
                w = summarize_window(report["current"])
                w["end"] = i
                w["row_outcomes"] = [r["outcome"] for r in report["current"]]
                w.update(_measure(report, stream_edits[:i], model, heldout, base_labels, publisher, downstream))
                if address is not None and report.get("restart", True):
                    model.save_snapshot()  # what a daemon stopping now would leave
                    w["restart_s"] = _restart(work, base, address)
                else:
                    w["restart_s"] = None
                report["windows"].append(w)
                report["current"] = []
                _print_window(w)
                plot_scale(_finish(report, total), work.with_suffix(".png"))
                save()
            if i >= total:
                break
            text, target, kind = stream_edits[i]
            row = _edit(store, worker, base, i, text, target, last)
            row["kind"] = kind
            report["current"].append(row)
            i += 1
            report["next"] = i
            save()
            ok = [r["outcome"] in ("patched", "already_fixed") for r in report["current"]]
            bar.update(1)
            bar.set_postfix(window_sr=f"{sum(ok) / len(ok):.3f}", last=row["outcome"], refresh=False)
            if i % window == window - 1 or (i == total - 1 and total % window):
                # the parent version: one patch short of the window's end; a watcher holds it
                _note_published(report, publisher.publish_if_changed())
                downstream.ask("check")
        bar.close()
        _finish(report, total)
        report["partial"] = i < total
        downstream.close()


def _set() -> Any:
    import threading

    event = threading.Event()
    event.set()
    return event


def _edit(store: Any, worker: Any, base: str, i: int, text: str, target: str, last: dict[str, Any]) -> dict[str, Any]:
    """Store one report, let the worker patch its mistake; one row of timings."""
    from memory.fingerprint import fingerprint, input_key, normalise_input
    from memory.records import ReportIn

    report = ReportIn(
        f"scale-{i}",
        base,
        fingerprint(base, text),
        input_key(normalise_input(text)),
        target,
        json.dumps({"input": text, "target": target}).encode(),
        "bench-scale",
        0,
        i,
        reporter=f"scale-reporter-{i}",
        input=text,
    )
    store.record_batch([report])
    mistake = store.next_mistake(base, worker.policy.quorum, worker.policy.conflict_share, claim=True)
    if mistake is None:  # a duplicate of an earlier claim: nothing to patch (the stream has none)
        return {"i": i, "outcome": "duplicate", "ms": 0.0, "train_ms": 0.0, "gate_ms": 0.0}
    last.clear()
    outcome = worker.process(mistake)
    timing = worker.stats.timings[-1]
    proposal = last.get("proposal")
    train_ms = proposal.train_seconds * 1000 if proposal is not None else 0.0
    propose_ms = proposal.seconds * 1000 if proposal is not None else 0.0
    return {
        "i": i,
        "outcome": outcome,
        "ms": timing.ms,
        "train_ms": round(train_ms, 2),
        "gate_ms": round(propose_ms - train_ms, 2),
        "attempts": timing.attempts,
    }


def _base_predictions(work: Path, model: Any, heldout: list[str]) -> list[str]:
    """The unpatched base's held-out labels (kept in the work directory: a resumed run has patches)."""
    path = work / "heldout-base-labels.json"
    if path.exists():
        return list(json.loads(path.read_text()))
    with model.patcher.wrapper.without_neurons():
        labels: list[str] = model.adapter.base_predict(heldout, progress=True)  # on disk per base and inputs
    path.write_text(json.dumps(labels))
    return labels


def _measure(
    report: dict[str, Any],
    done_edits: list[list[str]],
    model: Any,
    heldout: list[str],
    base_labels: list[str],
    publisher: Any,
    downstream: _Downstream,
) -> dict[str, Any]:
    outcomes = _outcomes(report)
    fixed = [(t, g) for (t, g, _k), o in zip(done_edits, outcomes, strict=False) if o in ("patched", "already_fixed")]
    t0 = time.perf_counter()
    answers = model.adapter.predict([t for t, _ in fixed]) if fixed else []
    er = sum(model.adapter.right(a, g) for a, (_t, g) in zip(answers, fixed, strict=True)) / max(1, len(fixed))
    now = model.adapter.predict(heldout)
    locality = sum(a == b for a, b in zip(now, base_labels, strict=True)) / len(heldout)
    eval_s = time.perf_counter() - t0
    overhead = _overhead(model, heldout)

    storage = publisher.storage
    storage.reset()
    published = publisher.publish_if_changed()
    publish_bytes = storage.written
    # nothing new since the parent version (the window's last edits were not patched): the version
    # served is the parent, and this publish wrote 0 bytes
    served = _note_published(report, published)
    fetched = downstream.ask("check")  # the watcher held the parent version
    loaded = downstream.ask("load")  # a downstream service starting now
    if served is not None and not fetched["version"] == loaded["version"] == served["number"]:
        raise RuntimeError(f"downstream serves {fetched} / {loaded}, not version {served['number']}")
    wrapper = model.patcher.wrapper
    return {
        "er": round(er, 4),
        "er_edits": len(fixed),
        "locality": round(locality, 4),
        "eval_s": round(eval_s, 1),
        "rss_mb": _rss_mb(),
        "neurons": wrapper.n,
        "memory_rows": len(model.patcher.memory),
        **overhead,
        "version": served["number"] if served else None,
        "version_bytes": served["size"] if served else None,
        "publish_bytes": publish_bytes,
        "fetch_bytes": fetched["read_bytes"],
        "fetch_s": fetched["seconds"],
        "load_s": loaded["seconds"],
    }


def _note_published(report: dict[str, Any], published: Any) -> dict[str, int] | None:
    """The version downstream is served: this publish's, or the last one's (kept in the report so
    that a resumed run knows it too)."""
    if published is not None:
        report["last_published"] = {"number": published.number, "size": published.size}
    last: dict[str, int] | None = report.get("last_published")
    return last


def _outcomes(report: dict[str, Any]) -> list[str]:
    """The outcome of every edit so far, in order (each window keeps its edits' in `row_outcomes`)."""
    out: list[str] = []
    for w in report["windows"]:
        out.extend(w["row_outcomes"])
    out.extend(r["outcome"] for r in report["current"])
    return out


def _overhead(model: Any, heldout: list[str], rounds: int = OVERHEAD_ROUNDS) -> dict[str, Any]:
    """Forward time patched / unpatched on fixed batches of 1 and 16 held-out inputs, alternating."""
    from patching import layer
    from patching.eval.timing import alternating

    net = model.base.model
    wrapper = model.patcher.wrapper
    batches = {b: model.adapter.serving_batch(heldout[:b]) for b in (1, 16)}
    out: dict[str, Any] = {}
    with torch.no_grad():
        for b, batch in batches.items():
            p, q, logits = alternating(partial(_logits, net, batch), wrapper.without_neurons, rounds)
            # the dense layer: every position, every neuron (the cut must give the same logits)
            old_share, layer._SPARSE_SHARE = layer._SPARSE_SHARE, -1.0
            wrapper.dense = True
            try:
                dense = net(**batch).logits
            finally:
                wrapper.dense, layer._SPARSE_SHARE = False, old_share
            out[f"overhead_b{b}"] = round(p / q - 1, 4)
            out[f"forward_ms_b{b}"] = round(p * 1000, 2)
            out[f"base_forward_ms_b{b}"] = round(q * 1000, 2)
            out[f"outputs_equal_dense_b{b}"] = bool(torch.equal(logits, dense))
    return out


def _logits(net: Any, batch: dict[str, Any]) -> torch.Tensor:
    return cast(torch.Tensor, net(**batch).logits)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


class _Downstream:
    """A downstream service in its own process (its memory is not the editing process's): a
    CheckpointWatcher that swaps on `check`, and a cold load_latest on `load`; each answer says
    the version served, the bytes read from storage and the seconds taken."""

    def __init__(self, root: Path, model: str, base_dir: Path):
        self.child = subprocess.Popen(
            [sys.executable, "-m", "daemon.tools.bench_scale", "downstream", str(root), model, str(base_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, command: str) -> dict[str, Any]:
        assert self.child.stdin is not None and self.child.stdout is not None
        self.child.stdin.write(command + "\n")
        self.child.stdin.flush()
        line = self.child.stdout.readline()
        if not line:
            raise RuntimeError(f"the downstream process ended (exit {self.child.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.child.stdin is not None:
            self.child.stdin.close()
        try:
            self.child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.child.kill()


def _downstream_main(root: str, model: str, base_dir: str) -> None:
    """The child of _Downstream: one JSON line per command read from stdin."""
    from patching.client import CheckpointWatcher, load_latest

    storage = _CountingStorage(Path(root))
    watcher = CheckpointWatcher(storage, model, base_dir, interval=3600.0)  # checked on command only
    for line in sys.stdin:
        storage.reset()
        t0 = time.perf_counter()
        if line.strip() == "check":
            watcher.check()
            version = watcher.version
        else:
            version = load_latest(storage, model, base_dir).version
        answer = {"version": version, "read_bytes": storage.read_bytes, "seconds": round(time.perf_counter() - t0, 3)}
        print(json.dumps(answer), flush=True)


def _restart(work: Path, base: str, address: str) -> float:
    """Seconds from starting `patchd run` on this run's state until its /readyz answers 200."""
    port = _free_port()
    env = {**os.environ, **_settings_env(work, base, address, port), "OMP_WAIT_POLICY": "PASSIVE"}
    log_path = work / "restart.log"
    with log_path.open("a") as out:
        t0 = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "daemon", "run"], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while time.perf_counter() - t0 < READY_TIMEOUT_S:
                if child.poll() is not None:
                    raise RuntimeError(
                        f"patchd run exited with {child.returncode} before it was ready (see {log_path})"
                    )
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                        if r.status == 200:
                            return round(time.perf_counter() - t0, 2)
                except (urllib.error.URLError, OSError):
                    pass
                time.sleep(0.1)
            raise RuntimeError(f"patchd run not ready after {READY_TIMEOUT_S:.0f}s (see {log_path})")
        finally:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=120)
            except subprocess.TimeoutExpired:
                child.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _finish(report: dict[str, Any], total: int) -> dict[str, Any]:
    """Top-level figures from the newest window."""
    if report["windows"]:
        w = report["windows"][-1]
        rows = _outcomes(report)
        done = sum(o in ("patched", "already_fixed") for o in rows)
        report.update(
            {
                "edits_done": len(rows),
                "sr": round(done / max(1, len(rows)), 4),
                "er": w["er"],
                "locality": w["locality"],
                "stream_total": total,
            }
        )
    return report


def _print_window(w: dict[str, Any]) -> None:
    restart = "not measured" if w["restart_s"] is None else f"{w['restart_s']}s"
    print(
        f"[{w['end']:>6} edits] edit {w['latency_ms_median']:.0f} ms (p95 {w['latency_ms_p95']:.0f}; train "
        f"{w['train_ms_median']:.0f}, gate {w['gate_ms_median']:.0f}) | SR {w['sr']:.3f} ER {w['er']:.3f} "
        f"loc {w['locality']:.3f} | {w['neurons']} neurons, M {w['memory_rows']} | overhead b1 "
        f"{100 * w['overhead_b1']:+.1f}% b16 {100 * w['overhead_b16']:+.1f}% | version {w['version_bytes']} B, "
        f"publish {w['publish_bytes']} B, fetch {w['fetch_bytes']} B, load {w['load_s']:.2f}s | restart "
        f"{restart} | RSS {w['rss_mb']:.0f} MB",
        flush=True,
    )


# ---------------------------------------------------------------------------- counting storage


class _CountingStorage(FileStorage):
    """FileStorage that counts the bytes written and read (what a publish and a fetch cost)."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.written = 0
        self.read_bytes = 0

    def reset(self) -> None:
        self.written = self.read_bytes = 0

    def put_version(self, model: str, number: int, files: Sequence[tuple[str, bytes]], step: Step = _no_step) -> str:
        self.written += sum(len(data) for _name, data in files)
        return super().put_version(model, number, files, step)

    def set_latest(self, model: str, number: int, step: Step = _no_step) -> None:
        self.written += len(str(number))
        super().set_latest(model, number, step)

    def read(self, model: str, number: int, name: str) -> bytes:
        data = super().read(model, number, name)
        self.read_bytes += len(data)
        return data


if __name__ == "__main__" and sys.argv[1:2] == ["downstream"]:
    _downstream_main(*sys.argv[2:5])
