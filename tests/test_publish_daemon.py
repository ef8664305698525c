"""Two processes on a real broker: `patchd run` publishing while a downstream CheckpointWatcher serves,
on each storage medium (a file system; an S3 bucket on the real S3 server).

The daemon is a child process; this test process is the downstream service. Corrections arrive in
waves; every version the daemon publishes must be served within 2 x the poll interval, and what
the watcher serves must be what the daemon's model computes. Afterwards (daemon stopped):
versions, rollback, revoke and export through the command line on the same state.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from kafka.admin import NewTopic

from daemon import cli
from daemon.publisher import storage_of
from daemon.settings import load_settings
from memory.fingerprint import fingerprint
from memory.lifecycle import Status
from memory.store import Store
from patching.checkpoint import read_verified
from patching.client import CheckpointWatcher, KafkaReleases, Loaded, load_latest, local_files, patch_set
from patching.loading import load_patched
from tests.tinybase import MODEL, Daemon, prepare, produce, sentence, write_config

POLL_S = 1.0  # the watcher's LATEST poll
PUBLISH_S = 2.5  # the daemon's publish.interval_s: > 2 polls apart, so the watcher sees every version
WAVES, PER_WAVE = 3, 4


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s}s")
        time.sleep(0.05)


@dataclass
class Run:
    config: Path
    settings: Any
    base: Path
    inputs: list[str]  # every correction's input, wave by wave
    targets: dict[str, str]
    heldout: list[str]
    base_predictions: dict[str, str]
    published: list[dict[str, Any]] = field(default_factory=list)  # the daemon's "version published" lines
    swaps: list[tuple[Loaded, float, list[str]]] = field(default_factory=list)  # (loaded, when, predictions)
    heard: list[tuple[int | None, float]] = field(default_factory=list)  # the release listener's swaps
    final: Loaded | None = None
    public_key: Path | None = None  # the daemon signs every version with its private twin


def _predictor(base: Path) -> Callable[[Any, list[str]], list[str]]:
    from patching.bases.load import load_base
    from patching.bases.tasks import TaskAdapter

    loaded = load_base(str(base))
    return lambda model, texts: TaskAdapter(replace(loaded, model=model)).predict(texts)


def _storage_toml(request: pytest.FixtureRequest, medium: str, tmp: Path) -> str:
    """[storage] for the medium: a directory, or a fresh prefix of the test bucket with its
    endpoint and credentials in the settings (as an operator's environment file would give them)."""
    if medium == "file":
        return f'[storage]\nroot = "{tmp / "ck"}"\n'
    from daemon.tools.s3server import BUCKET, S3ServerScript

    server: S3ServerScript = request.getfixturevalue("s3_server")
    lines = [f'root = "s3://{BUCKET}/publish-{random.randrange(1 << 30):x}"']
    lines += [f'{k.removeprefix("PATCHD_STORAGE_").lower()} = "{v}"' for k, v in server.settings_env().items()]
    lines.append(f'cache_dir = "{tmp / "s3-cache"}"')
    return "[storage]\n" + "\n".join(lines) + "\n"


@pytest.fixture(scope="module", params=["file", "s3"])
def run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, kafka_admin: Any
) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp(f"publish-{request.param}")
    base, data = prepare(tmp / "tiny")
    predict = _predictor(base)
    from patching.loading import load_base_model

    plain = load_base_model(base)
    rng = random.Random(5)
    inputs = [sentence(rng, first) for first in range(WAVES * PER_WAVE)]
    heldout = [json.loads(line)["input"] for line in (data / "heldout.jsonl").read_text().splitlines()[:30]]
    base_predictions = dict(zip(inputs + heldout, predict(plain, inputs + heldout), strict=True))
    # each correction asks for the label the base does NOT give: every one is a real mistake
    targets = {t: "REFUTES" if base_predictions[t] == "SUPPORTS" else "SUPPORTS" for t in inputs}

    topic = f"t-publish-{random.randrange(1 << 30):x}"
    kafka_admin.create_topics([NewTopic(t, 1, 1) for t in (topic, f"{topic}.dlq", f"{topic}.releases")])
    config = write_config(
        tmp / "patchd.toml", base=base, data=data, bootstrap=kafka_bootstrap, topic=topic, state=tmp / "state"
    )
    from patching.signing import generate

    private_key, public_key, _ = generate(tmp / "keys")
    config.write_text(
        config.read_text()
        + f'[publish]\ninterval_s = {PUBLISH_S}\nsigning_key = "{private_key}"\n'
        + _storage_toml(request, request.param, tmp)
    )
    settings = load_settings(config, {})
    r = Run(config, settings, base, inputs, targets, heldout, base_predictions, public_key=public_key)

    fixed = inputs + heldout

    def on_swap(loaded: Loaded) -> None:  # on the watcher's thread, as a service's callback would be
        r.swaps.append((loaded, time.time(), predict(loaded.model, fixed)))

    # each service has its own client (and, on S3, its own ETags and cache), as separate processes would
    # it trusts only the daemon's key: every version it serves was signed by the daemon
    watcher = CheckpointWatcher(
        storage_of(settings), MODEL, base, interval=POLL_S, on_swap=on_swap, trusted_keys=[public_key]
    ).start()
    # a second service that listens to the release events; its poll is too slow to find anything first
    listener = CheckpointWatcher(
        storage_of(settings),
        MODEL,
        base,
        interval=600,
        on_swap=lambda loaded: r.heard.append((loaded.version, time.time())),
        releases=KafkaReleases(kafka_bootstrap, settings.kafka.releases_topic),
    ).start()
    daemon = Daemon(config)
    try:
        assert daemon.wait_for(("patchd starting",), timeout_s=120)
        for wave in range(WAVES):
            batch = inputs[wave * PER_WAVE : (wave + 1) * PER_WAVE]
            events = [
                json.dumps({"id": f"w{wave}-{i}", "model": MODEL, "input": t, "target": targets[t], "reporter": "t"})
                for i, t in enumerate(batch)
            ]
            produce(kafka_bootstrap, topic, [e.encode() for e in events])
            assert daemon.wait_for(("mistake done",), count=PER_WAVE, timeout_s=120)
            with Store.open(settings.database.url, upgrade=False) as store:
                ids = [store.find_mistake(MODEL, fingerprint(MODEL, t)) for t in batch]
                patched = {m.id for m in ids if m is not None and m.status == Status.PATCHED}
            assert patched, "a wave of real mistakes where nothing was patched tells nothing"
            wait_until(
                lambda wanted=patched: wanted <= set(watcher.current().edits), 4 * PUBLISH_S, "the wave's fixes served"
            )
        daemon.proc.send_signal(signal.SIGTERM)  # warm stop; the lock is free once it logs "patchd stopped"
        assert daemon.wait_for(("patchd stopped",), timeout_s=60)
        r.published = daemon.events("version published")
        r.final = watcher.current()
    finally:
        watcher.stop()
        listener.stop()
    try:
        yield r  # the interpreter's exit takes seconds on a busy machine: the tests run meanwhile
    finally:
        assert daemon.finish(timeout_s=60) == 0


def test_watcher_serves_every_version_within_two_polls_and_matches_the_daemon(run: Run) -> None:
    swapped = {loaded.version: (loaded, at, preds) for loaded, at, preds in run.swaps}
    assert len(run.published) >= WAVES
    for event in run.published:
        assert event["version"] in swapped, f"version {event['version']} was never served"
        delay = swapped[event["version"]][1] - event["latest_at"]
        assert delay <= 2 * POLL_S, f"version {event['version']} served {delay:.2f}s after LATEST named it"
        print(f"version {event['version']}: served {delay:.3f}s after LATEST named it")
    # at most one publish per publish.interval_s, however many patches were accepted in between
    times = [e["latest_at"] for e in run.published]
    assert all(b - a > PUBLISH_S - 0.5 for a, b in zip(times, times[1:], strict=False))
    # the release listener heard of every version (its own poll was 600 s away)
    heard = dict(run.heard)
    for event in run.published:
        assert heard.get(event["version"], float("inf")) - event["latest_at"] < 2 * POLL_S

    fixed = run.inputs + run.heldout
    with Store.open(run.settings.database.url, upgrade=False) as store:
        text_of = {store.find_mistake(MODEL, fingerprint(MODEL, t)).id: t for t in run.inputs}  # type: ignore[union-attr]
    for loaded, _, preds in swapped.values():
        got = dict(zip(fixed, preds, strict=True))
        # the daemon's gate made each kept edit right and left every held-out prediction unchanged
        assert all(got[text_of[e]] == run.targets[text_of[e]] for e in loaded.edits)
        assert all(got[t] == run.base_predictions[t] for t in run.heldout)

    # the final version against the daemon's own model, rebuilt from the store as a restart would
    from daemon.model import PatchedModel
    from patching import encode

    assert run.final is not None and run.final.version == run.published[-1]["version"]
    with Store.open(run.settings.database.url, upgrade=False) as store:
        model = PatchedModel.load(run.settings)
        model.rebuild(store)
    batch = encode.classification(model.base.tokenizer, fixed).batch
    with torch.no_grad():
        daemon_logits = model.base.model(**batch).logits
        served_logits = run.final.model(**batch).logits
    assert torch.allclose(served_logits, daemon_logits, atol=1e-5)
    assert model.adapter.predict(fixed) == swapped[run.final.version][2]


def test_versions_rollback_revoke_export(run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ["--config", str(run.config)]
    storage = storage_of(run.settings)
    predict = _predictor(run.base)

    capsys.readouterr()
    assert cli.main(["versions", "--json", *cfg]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in rows] == storage.versions(MODEL) and rows[-1]["latest"]
    assert all(r["added"] and not r["removed"] for r in rows)

    # rollback: a NEW version equal to the second one; every later patch is marked removed
    target, last = rows[1]["version"], rows[-1]["version"]
    from memory.lock import ModelLock

    held = ModelLock(run.settings.database.url, MODEL)  # as a running daemon holds it
    assert held.try_acquire()
    try:
        assert cli.main(["rollback", str(target), *cfg]) == 1
    finally:
        held.release()
    assert storage.latest(MODEL) == last
    assert cli.main(["rollback", str(target), *cfg]) == 0
    rolled = storage.latest(MODEL)
    assert rolled == last + 1
    a, b = read_verified(storage, MODEL, target), read_verified(storage, MODEL, rolled)
    assert b.patch_ids == a.patch_ids and b.segments == a.segments  # the same segments, bit for bit
    assert b.manifest["rollback_of"] == target and b.manifest["parent"] == last
    fixed = run.inputs + run.heldout
    target_dir = tmp_path / "target"
    target_dir.mkdir()
    for name, data in local_files(a):  # the version's verified neurons, wherever they live
        (target_dir / name).write_bytes(data)
    assert predict(load_latest(storage, MODEL, run.base).model, fixed) == predict(
        load_patched(run.base, target_dir), fixed
    )
    with Store.open(run.settings.database.url, upgrade=False) as store:
        assert [p.id for p in store.accepted_patches(MODEL)] == a.patch_ids
        for edit in b.manifest["removed"]:
            assert store.get_mistake(edit).status == Status.REVOKED  # type: ignore[union-attr]
            assert all(
                p.removed_reason == f"rollback to version {target}" for p in store.patches_of(edit) if p.accepted
            )

    # revoke one edit: its neuron goes, the other edits are re-checked and still right
    edit = b.edits[0]
    assert cli.main(["revoke", "999999", *cfg]) == 1
    assert cli.main(["revoke", str(edit), *cfg]) == 0
    revoked = read_verified(storage, MODEL, storage.latest(MODEL))  # type: ignore[arg-type]
    assert len(revoked.edits) >= 2, "the other edits' retention must be checked on something"
    assert revoked.number == rolled + 1 and revoked.edits == b.edits[1:] and revoked.manifest["removed"] == [edit]
    keep = [i for i, e in enumerate(b.config.edit_ids) if e != str(edit)]
    (_, before), (_, after) = patch_set(b), patch_set(revoked)
    assert torch.equal(after.keys, before.keys[keep]) and torch.equal(after.values, before.values[keep])
    with Store.open(run.settings.database.url, upgrade=False) as store:
        text_of = {store.find_mistake(MODEL, fingerprint(MODEL, t)).id: t for t in run.inputs}  # type: ignore[union-attr]
    served = load_latest(storage, MODEL, run.base, trusted_keys=[run.public_key]).model
    # rollback and revoke signed what they published, with the daemon's key
    from patching.signing import load_trusted

    trusted = load_trusted([run.public_key])
    assert all(read_verified(storage, MODEL, n, trusted).signed_by for n in storage.versions(MODEL))
    texts = [text_of[e] for e in revoked.edits]
    assert predict(served, texts) == [run.targets[t] for t in texts]
    assert predict(served, [text_of[edit]]) != [run.targets[text_of[edit]]]  # the fix is gone

    # export: base + patches in one directory, loadable on its own
    out = tmp_path / "exported"
    assert cli.main(["export", "--out", str(out), *cfg]) == 0
    standalone = load_patched(out, out)
    batch_texts = texts + run.heldout
    assert predict(standalone, batch_texts) == predict(served, batch_texts)
    assert cli.main(["export", "--out", str(out), *cfg]) == 1  # never over an existing export
