"""The daemon's parts on their own: backpressure, catching up under a steady stream, scheduler job
options, replay and check commands."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon import cli
from daemon.consumer import Consumer
from daemon.scheduler import JOB_DEFAULTS, Jobs
from daemon.settings import load_settings
from memory.lifecycle import Status
from memory.store import Store
from tests.tinybase import (
    LABELS,
    MODEL,
    committed,
    correction_stream,
    event_ids,
    prepare,
    produce,
    run_once,
    write_config,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return prepare(tmp_path_factory.mktemp("tiny"))


def test_backpressure_pauses_and_resumes_without_losing_reports(
    tiny, tmp_path: Path, kafka_bootstrap: str, kafka_topic_factory: Callable[..., str]
) -> None:
    base, data = tiny
    topic = kafka_topic_factory()
    kafka_topic_factory(f"{topic}.dlq")
    stream = correction_stream(seed=4)
    produce(kafka_bootstrap, topic, stream.values)
    config = write_config(
        tmp_path / "p.toml",
        base=base,
        data=data,
        bootstrap=kafka_bootstrap,
        topic=topic,
        state=tmp_path / "state",
        max_pending=5,
        poll_max_records=10,
    )
    service = run_once(config)
    stats = service.consumer.stats
    assert stats.pauses >= 1  # 100 mistakes against a bound of 5
    assert stats.max_backlog <= 5 + 10  # one batch past the bound at most
    assert stats.new_reports == len(stream.valid_ids) and stats.rejected == 30
    with Store.open(load_settings(config, {}).database.url) as store:
        assert event_ids(store) == stream.valid_ids
        counts = store.status_counts("tiny")
        # the worker started before the topic was read (the queue was full), so a conflicting pair
        # may have been settled by its first report: only "nothing left behind" is certain here
        assert counts[Status.QUEUED] == counts[Status.PATCHING] == counts[Status.REPORTED] == 0


def test_a_steady_stream_never_keeps_the_worker_waiting(
    tiny, tmp_path: Path, kafka_bootstrap: str, kafka_topic_factory: Callable[..., str]
) -> None:
    """The worker starts once the backlog that was in Kafka at start is stored. Under a stream that
    brings a record within every poll's wait no poll comes back empty, and the daemon restarted
    under it (patchd bench chaos found it) used to wait for a lull that never came."""
    from kafka import KafkaProducer

    base, data = tiny
    topic = kafka_topic_factory()
    kafka_topic_factory(f"{topic}.dlq")
    backlog = correction_stream(seed=8).values[:100]
    produce(kafka_bootstrap, topic, backlog)
    config = write_config(
        tmp_path / "p.toml", base=base, data=data, bootstrap=kafka_bootstrap, topic=topic, state=tmp_path / "state",
        poll_max_records=10,
    )  # fmt: skip
    settings = load_settings(config, {})
    trickling = threading.Event()
    stop = threading.Event()

    def trickle() -> None:  # one record every 50 ms, far inside the consumer's 500 ms poll wait
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=0)
        values = correction_stream(seed=9).values + correction_stream(seed=10).values
        try:
            for value in values:
                if stop.is_set():
                    return
                producer.send(topic, value=value)
                trickling.set()
                time.sleep(0.05)
        finally:
            producer.close()

    sender = threading.Thread(target=trickle, daemon=True)
    with Store.open(settings.database.url) as store:
        consumer = Consumer(settings, store, LABELS, stop=threading.Event())
        assert consumer.connect()
        try:
            sender.start()
            assert trickling.wait(30)
            deadline = time.monotonic() + 25  # the 600 trickled records last 30 s
            while not consumer.caught_up.is_set() and time.monotonic() < deadline:
                consumer.step()
            assert sender.is_alive(), "the stream ended before the consumer said it caught up"
            assert consumer.caught_up.is_set() and consumer.work_allowed.is_set()
            assert consumer.stats.records >= len(backlog)  # the backlog first
        finally:
            stop.set()
            sender.join(timeout=30)
            consumer.close()


def test_scheduler_jobs_never_overlap_or_skip(tmp_path: Path) -> None:
    settings = load_settings(None, {"HOME": str(tmp_path)})
    jobs = Jobs(settings, snapshot=lambda: {"ok": True})
    assert JOB_DEFAULTS == {"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
    jobs.start()
    try:
        ids = {job.id for job in jobs.scheduler.get_jobs()}
        assert ids == {"publish", "retention", "health"}
        for job in jobs.scheduler.get_jobs():
            assert (job.max_instances, job.coalesce, job.misfire_grace_time) == (1, True, None)
    finally:
        jobs.shutdown()
    health = (tmp_path / ".local/state/patchd/health.json").read_text()
    assert '"state": "stopped"' in health


def test_replay_requeues_failed_mistakes_and_check_fails_without_kafka(
    tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, data = tiny
    config = write_config(
        tmp_path / "p.toml",
        base=base,
        data=data,
        bootstrap="127.0.0.1:1",
        topic="t",
        state=tmp_path / "state",
    )
    settings = load_settings(config, {})
    from daemon.messages import Limits, decode_event

    with Store.open(settings.database.url) as store:
        reports = [
            decode_event(
                v,
                topic="t",
                partition=0,
                offset=i,
                model="tiny",
                labels=("SUPPORTS", "REFUTES"),
                limits=Limits(),
            )
            for i, v in enumerate(correction_stream(5).values[:40])
        ]
        store.record_batch([r for r in reports if hasattr(r, "fingerprint")])
        first = store.next_mistake("tiny", claim=True)
        second = store.next_mistake("tiny", claim=True)
        store.set_status(first.id, Status.FAILED, note="test")
        store.set_status(second.id, Status.GATE_REJECTED, note="test")
    assert cli.main(["replay", "--from-db", "--config", str(config)]) == 0
    assert "re-queued 1 mistake" in capsys.readouterr().out
    assert cli.main(["replay", "--from-db", "--include-rejected", "--config", str(config)]) == 0
    assert "re-queued 1 mistake" in capsys.readouterr().out
    with Store.open(settings.database.url) as store:
        assert store.get_mistake(first.id).status == store.get_mistake(second.id).status == Status.QUEUED

    assert cli.main(["status", "--config", str(config)]) == 0
    assert "mistakes queued" in capsys.readouterr().out
    assert cli.main(["check", "--config", str(config)]) == 1  # nothing listens on port 1
    out = capsys.readouterr().out
    assert "ok   database" in out and "FAIL kafka" in out


def test_rebalance_between_two_consumers_loses_and_doubles_nothing(
    tiny, tmp_path: Path, kafka_bootstrap: str, kafka_topic_factory: Callable[..., str]
) -> None:
    base, data = tiny
    topic = kafka_topic_factory(partitions=2)
    kafka_topic_factory(f"{topic}.dlq")
    stream = correction_stream(seed=6)
    config = write_config(
        tmp_path / "p.toml",
        base=base,
        data=data,
        bootstrap=kafka_bootstrap,
        topic=topic,
        state=tmp_path / "state",
        poll_max_records=20,
    )
    settings = load_settings(config, {})
    thirds = [stream.values[i * 100 : (i + 1) * 100] for i in range(3)]

    with Store.open(settings.database.url) as store:
        threads: list[threading.Thread] = []

        def member(stop: threading.Event) -> Consumer:
            consumer = Consumer(settings, store, ("SUPPORTS", "REFUTES"), stop=stop)
            assert consumer.connect()

            def loop() -> None:  # one thread owns each consumer
                while not stop.is_set():
                    consumer.step(timeout_ms=200)
                consumer.close()

            threads.append(threading.Thread(target=loop, daemon=True))
            threads[-1].start()
            return consumer

        stop_a, stop_b = threading.Event(), threading.Event()
        a = member(stop_a)
        produce(kafka_bootstrap, topic, thirds[0], keyed=True)
        _until(lambda: a.stats.records >= 100, "the first third stored")
        b = member(stop_b)  # joins: the group rebalances mid-stream
        _until(lambda: len(b.consumer.assignment()) == 1 and len(a.consumer.assignment()) == 1, "rebalanced")
        produce(kafka_bootstrap, topic, thirds[1], keyed=True)
        _until(lambda: a.stats.records + b.stats.records >= 200, "the second third stored")
        stop_b.set()  # leaves: its partitions move back to the first member
        produce(kafka_bootstrap, topic, thirds[2], keyed=True)
        _until(
            lambda: sum(committed(kafka_bootstrap, settings.kafka.group_id).values()) == 300,
            "offsets committed to the end of both partitions",
        )
        stop_a.set()
        for thread in threads:
            thread.join(timeout=30)
        assert b.stats.records > 0, "the second member must have taken over a partition"
        assert event_ids(store) == stream.valid_ids  # nothing lost ...
        counts = store.table_counts()
        assert counts["reports"] == 270 and counts["rejected"] == 30  # ... nothing counted twice
        assert sum(m.report_count for m in store.mistakes(MODEL)) == 270


def _until(predicate: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s}s")
        time.sleep(0.1)
