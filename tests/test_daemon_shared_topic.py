"""Two daemons, two models, one topic (issue 23, "many models on one topic"): with
`[kafka] known_models` every event is handled by exactly one daemon, and the shared DLQ holds only
the truly bad events, each once. Without it, each daemon dead-lettered the other's valid events.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from daemon.settings import load_settings
from memory.store import Store
from tests.tinybase import LABELS, committed, prepare, produce, read_topic, run_once, sentence, write_config

# "alpha" sorts first: it dead-letters the events that neither daemon can claim
ALPHA, BETA = "alpha", "beta"


def test_two_daemons_share_a_topic(
    tmp_path: Path, kafka_bootstrap: str, kafka_topic_factory: Callable[..., str]
) -> None:
    base, data = prepare(tmp_path / "tiny")
    topic = kafka_topic_factory()
    kafka_topic_factory(f"{topic}.dlq")
    rng = random.Random(5)

    def correction(event_id: str, model: str, **fields: object) -> bytes:
        event = {"id": event_id, "model": model, "input": sentence(rng, len(event_id)), "target": rng.choice(LABELS),
                 "reporter": "r1", **fields}  # fmt: skip
        return json.dumps(event).encode()

    valid = {model: [f"{model}-{i}" for i in range(4)] for model in (ALPHA, BETA)}
    values = [correction(i, model) for model, ids in valid.items() for i in ids]
    # offset -> who must dead-letter it
    bad = {
        len(values): ALPHA,  # alpha's own invalid event (a label the model does not have)
        len(values) + 1: BETA,  # beta's own invalid event: beta dead-letters it, though alpha sorts first
        len(values) + 2: ALPHA,  # not JSON: nobody's, so the first model by name
        len(values) + 3: ALPHA,  # a model neither daemon serves
    }
    values += [
        correction("alpha-bad", ALPHA, target="NOT-A-LABEL"),
        correction("beta-bad", BETA, input="   "),
        b"{this is not json",
        correction("gamma-1", "gamma"),
    ]
    produce(kafka_bootstrap, topic, values)

    services = {}
    for model, other in ((ALPHA, BETA), (BETA, ALPHA)):
        config = write_config(tmp_path / f"{model}.toml", base=base, data=data, bootstrap=kafka_bootstrap,
                              topic=topic, state=tmp_path / model, model=model, group_id=f"patchd-{model}",
                              known_models=(other,))  # fmt: skip
        services[model] = run_once(config)
        settings = load_settings(config, {})
        with Store.open(settings.database.url) as store:
            assert store.event_ids(model) == set(valid[model])  # its own valid events, all of them
            assert store.table_counts()["rejected"] == sum(1 for owner in bad.values() if owner == model)
        assert committed(kafka_bootstrap, f"patchd-{model}") == {0: len(values)}  # it read past the rest

    stats = {model: service.consumer.stats for model, service in services.items()}
    assert stats[ALPHA].skipped_by_reason == {"other_model": len(valid[BETA]) + 1}
    assert stats[BETA].skipped_by_reason == {"other_model": len(valid[ALPHA]) + 1, "owner_rejects": 2}

    # asks for one more than expected: a doubled or stray dead letter would be read within 5 s
    dlq = read_topic(kafka_bootstrap, f"{topic}.dlq", len(bad) + 1, timeout_s=5)
    sources = sorted(int(dict(r.headers)["source_offset"]) for r in dlq)
    assert sources == sorted(bad)  # each bad event once, no valid one
    reasons = {int(dict(r.headers)["source_offset"]): dict(r.headers)["reason"].decode() for r in dlq}
    assert sorted(reasons.values()) == sorted(["unknown_label", "empty_input", "bad_json", "unknown_model"])
