"""Crash safety of `patchd run`: SIGKILL at random moments (on SQLite and on PostgreSQL, the
production backend), warm and cold stops by signal.

The daemon runs as a child process (`python -m daemon run`), as an operator runs it; the state it
leaves is compared with an uninterrupted run of the same stream.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.settings import load_settings
from memory.lifecycle import Status
from memory.store import Store
from tests.tinybase import (
    Daemon,
    assert_final_state,
    committed,
    correction_stream,
    event_ids,
    final_state,
    prepare,
    produce,
    read_topic,
    run_once,
    write_config,
)

PROGRESS = ("batch stored", "mistake done")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return prepare(tmp_path_factory.mktemp("tiny"))


def _config(tiny, tmp_path: Path, name: str, bootstrap: str, topic: str, **kw) -> Path:
    base, data = tiny
    config = write_config(
        tmp_path / f"{name}.toml",
        base=base,
        data=data,
        bootstrap=bootstrap,
        topic=topic,
        state=tmp_path / name,
        **kw,
    )
    # one consumer group per run: each run reads the whole topic on its own
    config.write_text(config.read_text().replace(f'group_id = "g-{topic}"', f'group_id = "g-{name}-{topic}"'))
    return config


def test_sigkill_at_random_moments_gives_the_uninterrupted_result(
    tiny,
    tmp_path: Path,
    kafka_bootstrap: str,
    kafka_topic_factory: Callable[..., str],
    daemon_database: Callable[[], str | None],
) -> None:
    topic = kafka_topic_factory()
    kafka_topic_factory(f"{topic}.dlq")
    stream = correction_stream(seed=1)
    produce(kafka_bootstrap, topic, stream.values)

    # uninterrupted, in-process
    run_once(_config(tiny, tmp_path, "reference", kafka_bootstrap, topic, database_url=daemon_database()))

    config = _config(tiny, tmp_path, "crashed", kafka_bootstrap, topic, database_url=daemon_database())
    rng = random.Random(7)
    kills = 0
    for _ in range(5):
        daemon = Daemon(config, "--once")
        # a random point in the work: after the k-th progress line, plus a random few milliseconds
        if daemon.wait_for(PROGRESS, count=rng.randint(1, 12)):
            time.sleep(rng.uniform(0, 0.03))
            daemon.proc.send_signal(signal.SIGKILL)
            kills += daemon.finish() == -signal.SIGKILL
        else:
            daemon.finish()
    assert kills == 5, "every run must have been killed in the middle of its work"
    survivor = run_once(config)
    assert survivor.rebuilt.replayed + survivor.rebuilt.restored > 0 and survivor.rebuilt.mismatches == []

    ref_settings = load_settings(tmp_path / "reference.toml", {})
    settings = load_settings(config, {})
    dlq = read_topic(kafka_bootstrap, f"{topic}.dlq", 60, timeout_s=5)
    with Store.open(ref_settings.database.url) as ref, Store.open(settings.database.url) as got:
        assert event_ids(got) == event_ids(ref) == stream.valid_ids
        assert final_state(got) == final_state(ref)  # same statuses and bit-identical kept neurons
        assert_final_state(got, stream, dlq)
    assert committed(kafka_bootstrap, settings.kafka.group_id) == {0: len(stream.values)}


def test_first_signal_stops_warm_second_stops_cold(
    tiny, tmp_path: Path, kafka_bootstrap: str, kafka_topic_factory: Callable[..., str]
) -> None:
    topic = kafka_topic_factory()
    kafka_topic_factory(f"{topic}.dlq")
    stream = correction_stream(seed=2)
    produce(kafka_bootstrap, topic, stream.values)
    config = _config(tiny, tmp_path, "signals", kafka_bootstrap, topic)
    settings = load_settings(config, {})

    # warm: the daemon (not --once) is patching; SIGTERM lets the neuron finish, commits, exits 0
    daemon = Daemon(config)
    assert daemon.wait_for(("mistake done",), count=3)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.finish(timeout_s=60) == 0
    assert daemon.events("warm stop: finishing the current batch and neuron")
    assert daemon.events("patchd stopped")[0]["exit"] == 0
    with Store.open(settings.database.url) as store:
        assert store.status_counts("tiny")[Status.PATCHING] == 0  # the current mistake was finished
        assert event_ids(store) == stream.valid_ids  # it had caught up before patching
    assert committed(kafka_bootstrap, settings.kafka.group_id) == {0: len(stream.values)}

    # cold: a second signal exits at once (128 + SIGTERM), and the next start loses nothing
    daemon = Daemon(config)
    assert daemon.wait_for(("mistake done",), count=2)
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.finish(timeout_s=30) in (0, 128 + signal.SIGTERM)
    run_once(config)
    dlq = read_topic(kafka_bootstrap, f"{topic}.dlq", 60, timeout_s=5)
    with Store.open(settings.database.url) as store:
        assert event_ids(store) == stream.valid_ids
        assert_final_state(store, stream, dlq)
