"""Every compression codec Kafka producers use reaches the store: one correction per codec (none,
gzip, snappy, lz4, zstd) sent by kcat (librdkafka, a client no one here wrote, from Debian's
packages) and consumed by `patchd run --once`. Before the codec libraries were dependencies, the
snappy batch raised UnsupportedCodecError out of poll() and the daemon crash-looped on it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from kafka import KafkaConsumer
from kafka.errors import UnsupportedCodecError

from daemon.settings import load_settings
from memory.store import Store
from tests.tinybase import LABELS, MODEL, committed, kcat, prepare, run_once, sentence, write_config

CODECS = ("none", "gzip", "snappy", "lz4", "zstd")


def _read_all(bootstrap: str, topic: str, count: int) -> int:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    try:
        got = 0
        for _ in range(40):
            got += sum(len(batch) for batch in consumer.poll(timeout_ms=500).values())
            if got >= count:
                break
        return got
    finally:
        consumer.close()


def test_every_codec_from_kcat_is_stored(
    tmp_path: Path,
    kafka_bootstrap: str,
    kafka_topic_factory: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, data = prepare(tmp_path / "tiny")
    topic = kafka_topic_factory()
    kafka_topic_factory(f"{topic}.dlq")
    rng = random.Random(3)
    events = []
    for i, codec in enumerate(CODECS):
        # padding in a field the daemon ignores: librdkafka sends a batch uncompressed when
        # compressing would not make it smaller, and a one-line event is too small to shrink
        event = {"id": f"codec-{codec}", "model": MODEL, "input": sentence(rng, i), "target": rng.choice(LABELS),
                 "reporter": "kcat", "padding": "compressible " * 200}  # fmt: skip
        events.append(event)
        kcat(kafka_bootstrap, topic, [json.dumps(event).encode()], codec)

    # each compressed batch really is in its codec: a consumer without that codec's library fails on it
    for codec in CODECS[1:]:
        with monkeypatch.context() as patch:
            patch.setattr(f"kafka.codec.has_{codec}", lambda: False)
            with pytest.raises(UnsupportedCodecError, match=codec):
                _read_all(kafka_bootstrap, topic, len(events))
    assert _read_all(kafka_bootstrap, topic, len(events)) == len(events)

    config = write_config(tmp_path / "codecs.toml", base=base, data=data, bootstrap=kafka_bootstrap, topic=topic,
                          state=tmp_path / "state")  # fmt: skip
    run_once(config)
    settings = load_settings(config, {})
    with Store.open(settings.database.url) as store:
        assert store.event_ids(MODEL) == {e["id"] for e in events}
        assert store.table_counts()["rejected"] == 0
    assert committed(kafka_bootstrap, settings.kafka.group_id) == {0: len(events)}
