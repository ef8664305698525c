"""Coordinated bad reports against the real daemon and broker (issue 23):

- 30 fresh reporter names agree on a wrong "correction" that flips a held-out claim the model gets
  right: with probation on, it is held for review (not patched), `patchd status` shows it, and
  only an operator's approval queues it (where the locality gate still refuses the neuron), while
  a correction that an established reporter backs goes through;
- one reporter floods 10,000 reports: 100 are stored (the rate limit), the rest are dead-lettered
  as reporter_rate_limited and kept in the database, other reporters' corrections are all stored
  and worked on, and every record is accounted for.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as T

from daemon.cli import main as patchd
from daemon.settings import load_settings
from memory.fingerprint import fingerprint
from memory.lifecycle import Status
from memory.store import Store
from tests.tinybase import LABELS, MODEL, committed, prepare, produce, read_topic, run_once, sentence, write_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return prepare(tmp_path_factory.mktemp("tiny"))


def predict(base: Path, text: str) -> str:
    """The unpatched tiny base's answer (a plain transformers forward, not patchd's code)."""
    tokenizer = T.AutoTokenizer.from_pretrained(base)
    model = T.AutoModelForSequenceClassification.from_pretrained(base).eval()
    with torch.no_grad():
        logits = model(**tokenizer(text, return_tensors="pt")).logits
    return str(model.config.id2label[int(logits.argmax())])


def with_policy(config: Path, **policy: object) -> Path:
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in policy.items())
    config.write_text(config.read_text() + f"[policy]\n{lines}")
    return config


def report(event_id: str, text: str, target: str, reporter: str) -> bytes:
    return json.dumps({"id": event_id, "model": MODEL, "input": text, "target": target, "reporter": reporter}).encode()


def test_thirty_fresh_names_cannot_patch_a_fact_alone(
    tiny,
    tmp_path: Path,
    kafka_bootstrap: str,
    kafka_topic_factory: Callable[..., str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, data = tiny
    topic = kafka_topic_factory()
    kafka_topic_factory(f"{topic}.dlq")
    probation_s = 3.0
    config = with_policy(
        write_config(
            tmp_path / "c.toml", base=base, data=data, bootstrap=kafka_bootstrap, topic=topic, state=tmp_path / "state"
        ),  # fmt: skip
        quorum=2,
        reporter_probation_s=probation_s,
    )
    settings = load_settings(config, {})
    rng = random.Random(21)
    early, legit = sentence(rng, 1), sentence(rng, 2)
    # two reporters who will have a history: on their first day, what they report alone is held too
    first = [report("v-1", early, LABELS[0], "veteran"), report("v-2", early, LABELS[0], "old-hand")]
    produce(kafka_bootstrap, topic, first)
    run_once(config)
    with Store.open(settings.database.url) as store:
        assert store.find_mistake(MODEL, fingerprint(MODEL, early)).status == Status.HELD
    time.sleep(probation_s + 0.5)  # now their first reports are older than the probation

    # the attack: a held-out claim the model gets right, "corrected" to the other label by 30 fresh names
    heldout = json.loads((data / "heldout.jsonl").read_text().splitlines()[0])["input"]
    right = predict(base, heldout)
    wrong = next(label for label in LABELS if label != right)
    attack = [report(f"sybil-{i}", heldout, wrong, f"fresh-name-{i}") for i in range(30)]
    # a real correction that an established reporter backs (quorum 2: one veteran, one newcomer)
    real = [report("l-1", legit, LABELS[1], "veteran"), report("l-2", legit, LABELS[1], "newcomer")]
    produce(kafka_bootstrap, topic, attack + real)
    run_once(config)

    with Store.open(settings.database.url) as store:
        attacked = store.find_mistake(MODEL, fingerprint(MODEL, heldout))
        assert attacked is not None and attacked.status == Status.HELD and attacked.reporter_count == 30
        assert store.patches_of(attacked.id) == []  # no neuron was even trained for it
        backed = store.find_mistake(MODEL, fingerprint(MODEL, legit))
        assert backed is not None and backed.status in (Status.PATCHED, Status.ALREADY_FIXED, Status.GATE_REJECTED)
    assert patchd(["status", "--config", str(config)]) == 0
    status = capsys.readouterr().out
    assert any(line.split() == ["mistakes", "held", "for", "review", "2"] for line in status.splitlines()), status
    assert patchd(["review", "list", "--config", str(config), "--json"]) == 0
    held = {row["id"]: row for row in json.loads(capsys.readouterr().out)}
    assert (held[attacked.id]["target"], held[attacked.id]["reporters"]) == (wrong, 30)

    # more fresh names change nothing: it stays held until an operator decides
    produce(kafka_bootstrap, topic, [report(f"sybil-more-{i}", heldout, wrong, f"fresh-more-{i}") for i in range(5)])
    run_once(config)
    with Store.open(settings.database.url) as store:
        assert store.get_mistake(attacked.id).status == Status.HELD

    # an operator approves it: the daemon takes it, and the gate still refuses to flip a held-out claim
    assert patchd(["review", "dismiss", "--config", str(config), str(backed.id)]) == 1  # not held: refused
    assert patchd(["review", "approve", "--config", str(config), str(attacked.id), "--by", "carol",
                   "--reason", "checked by hand"]) == 0  # fmt: skip
    run_once(config)
    with Store.open(settings.database.url) as store:
        final = store.get_mistake(attacked.id)
        assert final.status == Status.GATE_REJECTED
        assert not any(p.accepted for p in store.patches_of(attacked.id))


def test_a_flood_from_one_reporter_is_rate_limited_and_nothing_is_lost(
    tiny, tmp_path: Path, kafka_bootstrap: str, kafka_topic_factory: Callable[..., str]
) -> None:
    base, data = tiny
    topic = kafka_topic_factory()
    kafka_topic_factory(f"{topic}.dlq")
    config = write_config(tmp_path / "c.toml", base=base, data=data, bootstrap=kafka_bootstrap, topic=topic,
                          state=tmp_path / "state")  # fmt: skip
    settings = load_settings(config, {})
    rng = random.Random(22)
    flood_inputs = [sentence(rng, 10 + i) for i in range(5)]
    others = {f"other-{i}": (sentence(rng, 40 + i), rng.choice(LABELS)) for i in range(20)}
    values = [report(f"flood-{i}", flood_inputs[i % 5], LABELS[i % 2], "flooder") for i in range(10_000)]
    for k, (event_id, (text, target)) in enumerate(others.items()):  # spread through the flood
        values.insert(500 * k + 250, report(event_id, text, target, f"user-{k}"))
    produce(kafka_bootstrap, topic, values)
    run_once(config)

    limit = settings.policy.reporter_rate_limit
    with Store.open(settings.database.url) as store:
        ids = store.event_ids(MODEL)
        assert set(others) <= ids  # every other reporter's correction is stored ...
        assert len([i for i in ids if i.startswith("flood-")]) == limit  # ... and the flooder's first 100
        assert store.table_counts()["rejected"] == 10_000 - limit  # the rest kept, as rejected rows
        for text, _ in others.values():  # and worked on: none is left waiting
            mistake = store.find_mistake(MODEL, fingerprint(MODEL, text))
            assert mistake is not None and mistake.status not in (Status.REPORTED, Status.QUEUED, Status.PATCHING)
    assert committed(kafka_bootstrap, settings.kafka.group_id) == {0: len(values)}
    dlq = read_topic(kafka_bootstrap, f"{topic}.dlq", 10_000 - limit + 1, timeout_s=20)
    sources = {int(dict(r.headers)["source_offset"]) for r in dlq}
    assert len(sources) == 10_000 - limit
    assert Counter(dict(r.headers)["reason"] for r in dlq) == {b"reporter_rate_limited": len(dlq)}
    # nothing lost: every offset is a stored report or a dead letter, none both
    flood_offsets = {i for i, v in enumerate(values) if b'"flooder"' in v}
    assert sources <= flood_offsets and len(flood_offsets - sources) == limit
