"""Records the daemon cannot decode, or that are far too large, never crash-loop it (issue 23).

Everything is sent by kcat (librdkafka) to the real broker:
- a batch corrupted on the broker's disk (its CRC no longer matches): the partition stops at that
  offset, the other partition goes on, `patchd status`, /readyz and /metrics name it, and
  `patchd kafka skip` moves past it, with a marker in the DLQ and the command recorded;
- a batch in a codec the client cannot read (zstd with its library switched off in this process):
  runs end cleanly with the partition stuck, the same episode is continued on the next run, and
  after `patchd kafka retry` plus the library back, the records are stored;
- an event that decompresses to 20 MB and one of 900 KB: dead-lettered (cut to fit the DLQ, with
  their length and sha256), beside 3,000 events in one compressed batch, all stored;
- an unhandled error in the consumer loop or the worker: exit 1 after a logged, orderly stop,
  the claimed mistake back in the queue.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.cli import main as patchd
from daemon.service import Service
from daemon.settings import Settings, load_settings
from daemon.tools.broker import BrokerScript, free_ports
from memory.lifecycle import Status
from memory.store import Store
from tests.test_health import get, metrics
from tests.tinybase import LABELS, MODEL, committed, kcat, prepare, read_topic, run_once, sentence, write_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return prepare(tmp_path_factory.mktemp("tiny"))


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s}s")
        time.sleep(0.2)


class Running:
    """A Service run in a thread of this process (so a test can look at it while it runs)."""

    def __init__(self, settings: Settings) -> None:
        self.service = Service(settings, handle_signals=False)
        self.result: list[int] = []
        self.thread = threading.Thread(target=lambda: self.result.append(self.service.run()), daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.service.request_stop("test over")
        self.thread.join(timeout=120)
        assert not self.thread.is_alive()


def events(rng: random.Random, prefix: str, count: int, **fields: object) -> list[bytes]:
    return [
        json.dumps(
            {
                "id": f"{prefix}-{i}",
                "model": MODEL,
                "input": sentence(rng, i),
                "target": rng.choice(LABELS),
                "reporter": f"r{i}",
                **fields,
            }
        ).encode()  # fmt: skip
        for i in range(count)
    ]


@pytest.fixture
def own_broker(kafka_broker: BrokerScript | None) -> BrokerScript:
    assert kafka_broker is not None, "this test corrupts the broker's log on disk: it needs the broker it started"
    return kafka_broker


def corrupt_on_disk(broker: BrokerScript, topic: str, partition: int, marker: bytes) -> None:
    """Flip one byte of `marker` in the partition's log segment, as bit rot would."""
    segment = broker.state_dir / "kafka-data" / f"{topic}-{partition}" / "00000000000000000000.log"
    data = segment.read_bytes()
    at = data.index(marker)
    with segment.open("r+b") as f:
        f.seek(at)
        f.write(bytes([data[at] ^ 0x20]))


def test_a_corrupt_batch_stops_its_partition_only_until_an_operator_skips_it(
    tiny, tmp_path: Path, own_broker: BrokerScript, kafka_topic_factory: Callable[..., str]
) -> None:
    base, data = tiny
    bootstrap = own_broker.bootstrap
    topic = kafka_topic_factory(partitions=2)
    kafka_topic_factory(f"{topic}.dlq")
    rng = random.Random(11)
    first, doomed, after = events(rng, "p0", 3)
    doomed = doomed.replace(b'"reporter"', b'"marker": "CORRUPT-ME-PLEASE", "reporter"')
    for value in (first, doomed, after):  # one batch each: only the middle one is corrupted
        kcat(bootstrap, topic, [value], partition=0)
    other = events(rng, "p1", 4)
    kcat(bootstrap, topic, other, codec="lz4", partition=1)
    corrupt_on_disk(own_broker, topic, 0, b"CORRUPT-ME-PLEASE")

    (health_port,) = free_ports(1)
    config = write_config(tmp_path / "c.toml", base=base, data=data, bootstrap=bootstrap, topic=topic,
                          state=tmp_path / "state", health_port=health_port)  # fmt: skip
    settings = load_settings(config, {})
    url = f"http://127.0.0.1:{health_port}"
    with Store.open(settings.database.url) as store, Running(settings) as run:
        # partition 1 and the record before the corrupt batch are stored; the partition stops there
        wait_until(lambda: {"p0-0", "p1-0", "p1-1", "p1-2", "p1-3"} <= store.event_ids(MODEL), "the readable events")
        wait_until(lambda: bool(store.stuck_partitions(MODEL)), "the stuck partition recorded")
        (stuck,) = store.stuck_partitions(MODEL)
        assert (stuck.topic, stuck.partition, stuck.offset) == (topic, 0, 1)
        assert "CorruptRecordError" in stuck.error
        assert "p0-2" not in store.event_ids(MODEL)  # nothing after it is read without an operator
        assert run.service.phase == "running" and run.thread.is_alive()

        status, body = get(url + "/readyz")
        ready = json.loads(body)
        assert status == 503 and ready["checks"]["partitions_flowing"] is False
        assert ready["stuck_partitions"][0]["partition"] == 0 and ready["stuck_partitions"][0]["offset"] == 1
        scraped = metrics(url)
        assert scraped["patchd_consumer_stuck_partitions"] == 1
        assert scraped[f'patchd_consumer_stuck_offset{{partition="0",topic="{topic}"}}'] == 1

        summary = store.status_summary(MODEL, 1).as_dict()
        assert [(s["partition"], s["offset"]) for s in summary["stuck_partitions"]] == [(0, 1)]

        # a skip naming another offset is refused: nothing else may be given up
        assert patchd(["kafka", "skip", "--config", str(config), "--partition", "0", "--offset", "2"]) == 1
        assert patchd(["kafka", "skip", "--config", str(config), "--partition", "0", "--offset", "1",
                       "--by", "alice", "--reason", "bit rot on broker 1"]) == 0  # fmt: skip
        wait_until(lambda: "p0-2" in store.event_ids(MODEL), "the record after the skipped batch")
        wait_until(lambda: not store.stuck_partitions(MODEL), "the episode resolved")
        wait_until(lambda: get(url + "/readyz")[0] == 200, "ready again")

    assert run.result == [0]
    with Store.open(settings.database.url) as store:
        (done,) = store.stuck_partitions(MODEL, open_only=False)
        assert (done.command, done.operator, done.reason) == ("skip", "alice", "bit rot on broker 1")
        assert done.resolution == "skipped offsets 1..1 (1) for alice"
        assert store.table_counts()["rejected"] == 1  # the marker: reason undecodable_batch
    assert committed(bootstrap, settings.kafka.group_id) == {0: 3, 1: 4}
    (marker,) = read_topic(bootstrap, f"{topic}.dlq", 2, timeout_s=5)
    headers = dict(marker.headers)
    assert headers["reason"] == b"undecodable_batch" and marker.value == b""
    assert (headers["source_partition"], headers["source_offset"], headers["source_last_offset"]) == (b"0", b"1", b"1")


@pytest.fixture
def no_zstd(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], None]]:
    """This process's Kafka client without zstd, as a client missing the library would be."""
    monkeypatch.setattr("kafka.codec.has_zstd", lambda: False)
    yield monkeypatch.undo


def test_an_unreadable_codec_never_crash_loops_and_a_retry_reads_it_later(
    tiny,
    tmp_path: Path,
    kafka_bootstrap: str,
    kafka_topic_factory: Callable[..., str],
    no_zstd: Callable[[], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, data = tiny
    topic = kafka_topic_factory()
    kafka_topic_factory(f"{topic}.dlq")
    rng = random.Random(12)
    before, zstd_one, zstd_two, after = events(rng, "z", 4, padding="compressible " * 200)
    kcat(kafka_bootstrap, topic, [before])
    kcat(kafka_bootstrap, topic, [zstd_one, zstd_two], codec="zstd")
    kcat(kafka_bootstrap, topic, [after])
    config = write_config(tmp_path / "c.toml", base=base, data=data, bootstrap=kafka_bootstrap, topic=topic,
                          state=tmp_path / "state")  # fmt: skip
    settings = load_settings(config, {})

    for _ in range(2):  # the same batch on every start: each run ends cleanly, with one episode
        run_once(config)
        with Store.open(settings.database.url) as store:
            assert store.event_ids(MODEL) == {"z-0"}
            (stuck,) = store.stuck_partitions(MODEL, open_only=False)
            assert stuck.offset == 1 and "UnsupportedCodecError" in stuck.error and stuck.resolved_at is None
        assert committed(kafka_bootstrap, settings.kafka.group_id) == {0: 1}

    assert patchd(["status", "--config", str(config)]) == 0
    assert f"STUCK {topic}[0]" in capsys.readouterr().out
    assert patchd(["kafka", "retry", "--config", str(config), "--partition", "0", "--by", "bob"]) == 0
    no_zstd()  # the library is back
    run_once(config)
    with Store.open(settings.database.url) as store:
        assert store.event_ids(MODEL) == {"z-0", "z-1", "z-2", "z-3"}
        (stuck,) = store.stuck_partitions(MODEL, open_only=False)
        assert stuck.resolution == "read past offset 1: its records decoded, after retry asked by bob"
    assert committed(kafka_bootstrap, settings.kafka.group_id) == {0: 4}


def test_oversized_events_are_dead_lettered_whole_in_the_store_and_cut_in_the_dlq(
    tiny, tmp_path: Path, kafka_bootstrap: str, kafka_topic_factory: Callable[..., str]
) -> None:
    base, data = tiny
    topic = kafka_topic_factory()
    kafka_topic_factory(f"{topic}.dlq")
    huge = json.dumps({"id": "huge", "model": MODEL, "input": "a" * 20_000_000, "target": LABELS[0]}).encode()
    large = json.dumps({"id": "large", "model": MODEL, "input": "b" * 900_000, "target": LABELS[0]}).encode()
    kcat(kafka_bootstrap, topic, [huge], codec="gzip", options=("-X", "message.max.bytes=30000000"))
    kcat(kafka_bootstrap, topic, [large])
    # 3,000 reports of one mistake in one lz4 batch, larger than a poll's 200 records
    many = [json.dumps({"id": f"m-{i}", "model": MODEL, "input": "the same claim", "target": LABELS[1],
                        "reporter": f"r{i % 40}"}).encode() for i in range(3000)]  # fmt: skip
    kcat(kafka_bootstrap, topic, many, codec="lz4", options=("-X", "batch.num.messages=10000"))
    config = write_config(tmp_path / "c.toml", base=base, data=data, bootstrap=kafka_bootstrap, topic=topic,
                          state=tmp_path / "state")  # fmt: skip
    settings = load_settings(config, {})
    run_once(config)
    with Store.open(settings.database.url) as store:
        assert len(store.event_ids(MODEL)) == 3000
        assert store.table_counts()["rejected"] == 2
        assert not store.stuck_partitions(MODEL, open_only=False)
        assert store.status_counts(MODEL)[Status.QUEUED] == 0
    assert committed(kafka_bootstrap, settings.kafka.group_id) == {0: 3002}
    dlq = read_topic(kafka_bootstrap, f"{topic}.dlq", 3, timeout_s=5)
    assert len(dlq) == 2
    for record, original in zip(dlq, (huge, large), strict=True):
        headers = dict(record.headers)
        assert headers["reason"] == b"event_too_large"
        assert int(headers["truncated_from_bytes"]) == len(original)
        assert headers["sha256"] == hashlib.sha256(original).hexdigest().encode()
        assert record.value == original[: len(record.value)] and len(record.value) == 512 * 1024


def test_an_unhandled_error_stops_the_daemon_in_order_with_exit_1(
    tiny, tmp_path: Path, kafka_bootstrap: str, kafka_topic_factory: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, data = tiny
    topic = kafka_topic_factory()
    kafka_topic_factory(f"{topic}.dlq")
    from tests.tinybase import produce

    produce(kafka_bootstrap, topic, events(random.Random(13), "u", 2))
    config = write_config(tmp_path / "c.toml", base=base, data=data, bootstrap=kafka_bootstrap, topic=topic,
                          state=tmp_path / "state")  # fmt: skip
    settings = load_settings(config, {})

    # the worker meets an error that is not a verdict (here a KeyError from the model): the service
    # stops, exits 1, and the mistake it had claimed is back in the queue, not left in `patching`
    from daemon.model import PatchedModel

    def broken(self: PatchedModel, *args: object, **kwargs: object) -> None:
        raise KeyError("a bug in the model code")

    monkeypatch.setattr(PatchedModel, "propose", broken)
    service = Service(settings, once=True, handle_signals=False)
    assert service.run() == 1
    with Store.open(settings.database.url) as store:
        counts = store.status_counts(MODEL)
        assert counts[Status.PATCHING] == 0 and counts[Status.QUEUED] == 2
    monkeypatch.undo()

    # an unhandled error in the consumer loop: the same orderly stop, exit 1, nothing lost
    from daemon.consumer import Consumer

    def fails(self: Consumer, timeout_ms: int = 500) -> int:
        raise RuntimeError("a bug in the consumer loop")

    monkeypatch.setattr(Consumer, "step", fails)
    service = Service(settings, once=True, handle_signals=False)
    assert service.run() == 1
    assert service.failure == "RuntimeError: a bug in the consumer loop"
    assert not service.worker.is_alive()
    monkeypatch.undo()
    run_once(config)  # and the next start does the work
    with Store.open(settings.database.url) as store:
        counts = store.status_counts(MODEL)
        assert counts[Status.QUEUED] == counts[Status.PATCHING] == 0
