"""End to end on the real broker: the issue's 300-event stream through `patchd run --once`, on
SQLite (the embedded default) and on PostgreSQL (the production backend)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from daemon import cli
from daemon.model import ModelSetupError, PatchedModel
from daemon.settings import load_settings
from memory.lifecycle import Status
from memory.store import Store
from tests.test_engine_snapshot import assert_same_engine
from tests.tinybase import (
    assert_final_state,
    committed,
    correction_stream,
    dlq_unique,
    prepare,
    produce,
    read_topic,
    write_config,
)


@pytest.fixture
def keep_signals() -> Iterator[None]:
    """`patchd run` installs SIGTERM/SIGINT handlers in this (pytest's) process: put pytest's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return prepare(tmp_path_factory.mktemp("tiny"))


def test_run_once_end_to_end(
    tiny,
    tmp_path: Path,
    kafka_bootstrap: str,
    kafka_topic_factory: Callable[..., str],
    keep_signals: None,
    capsys: pytest.CaptureFixture[str],
    daemon_database: Callable[[], str | None],
) -> None:
    base, data = tiny
    topic = kafka_topic_factory()
    kafka_topic_factory(f"{topic}.dlq")
    stream = correction_stream(seed=0)
    produce(kafka_bootstrap, topic, stream.values)
    config = write_config(
        tmp_path / "patchd.toml",
        base=base,
        data=data,
        bootstrap=kafka_bootstrap,
        topic=topic,
        state=tmp_path / "state",
        database_url=daemon_database(),
    )

    started = time.monotonic()
    assert cli.main(["run", "--once", "--config", str(config)]) == 0
    print(f"run --once: {time.monotonic() - started:.1f}s")

    settings = load_settings(config, os.environ)
    dlq = read_topic(kafka_bootstrap, f"{topic}.dlq", 30)
    assert len(dlq) == 30
    sample = dlq_unique(dlq)[0]
    headers = dict(sample.headers)
    assert headers["source_topic"].decode() == topic and int(headers["source_offset"]) >= 0
    assert sample.value == stream.values[int(headers["source_offset"])]  # the original bytes
    assert committed(kafka_bootstrap, settings.kafka.group_id) == {0: 300}

    with Store.open(settings.database.url) as store:
        final = assert_final_state(store, stream, dlq)
        patched = [t for t, s in final.items() if s == Status.PATCHED]
        assert patched, "a random classifier gets about half of random targets wrong"
        # restart path: a fresh model rebuilt from the stored patches answers every patched input
        model = PatchedModel.load(settings)
        rebuilt = model.rebuild(store)
        # the warm stop wrote the engine snapshot: restored at once, nothing replayed
        assert rebuilt.restored == len(patched) and rebuilt.replayed == 0
        # without it every patch is replayed (gates re-checked), to the same model bit for bit
        assert model.snapshot_path is not None and model.snapshot_path.exists()
        model.snapshot_path.unlink()
        replayed = PatchedModel.load(settings)
        again = replayed.rebuild(store)
        assert again.replayed == len(patched) and again.restored == 0 and again.mismatches == []
        assert_same_engine(model.patcher, replayed.patcher)
        replayed.patcher.detach()
        predictions = model.adapter.predict(patched)
        assert predictions == [stream.inputs[t] for t in patched]
        fixed = [t for t, s in final.items() if s == Status.ALREADY_FIXED]
        assert model.adapter.predict(fixed) == [stream.inputs[t] for t in fixed]
        # a model set to another patch activation than the stored patches' refuses to replay them
        other = replace(settings, trainer=replace(settings.trainer, activation="relu"))
        with pytest.raises(ModelSetupError, match=r"activation 'relu-cap', this model runs 'relu'.*\[trainer\]"):
            PatchedModel.load(other).rebuild(store)

    capsys.readouterr()
    assert cli.main(["status", "--json", "--config", str(config)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reports"] == 270 and report["rejected"] == 30 and report["patches"] == len(patched)
    assert report["mistakes"]["conflicting"] == 20
    # the run published what it patched: LATEST's version holds exactly the kept patches
    from patching.checkpoint import read_verified
    from patching.storage_uri import open_storage

    storage = open_storage(settings.storage.root)
    assert report["last_version"] == storage.latest("tiny") is not None
    with Store.open(settings.database.url) as store:
        kept = [p.id for p in store.accepted_patches("tiny")]
    assert read_verified(storage, "tiny", report["last_version"]).patch_ids == kept
    assert report["backlog"] == 0
    assert cli.main(["check", "--config", str(config)]) == 0
