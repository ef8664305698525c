"""Provenance (issue 23): which corrections shape an answer, from the published version alone.

After a real stream through `patchd run --once` (real broker, tiny base), a downstream service's
`load_latest(...).why(inputs)` and `patchd why TEXT` name, for every corrected input, its own edit
first, with the mistake, target, reporters and first version the version carries; unrelated
held-out inputs name no edit.
"""

from __future__ import annotations

import json
import random
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
from patching.client import load_latest
from patching.provenance import edit_contributions
from tests.tinybase import LABELS, MODEL, prepare, produce, run_once, sentence, write_config


def test_shares_of_firing_edits_sum_to_one_and_silent_neurons_are_left_out() -> None:
    torch.manual_seed(0)
    d = 8
    q = torch.randn(d)
    keys = torch.stack([q, q, -q, 0.5 * q])  # edit 1: two neurons, edit 2 silent, edit 3 one neuron
    biases = torch.zeros(4)
    values = torch.randn(4, d)
    found = edit_contributions(q, keys, biases, values, "relu", ["1", "1", "2", "3"])
    assert [e for e, _, _ in found] == sorted(["1", "3"], key=lambda e: -dict((x, s) for x, _, s in found)[e])
    assert abs(sum(s for _, _, s in found) - 1.0) < 1e-5
    act = (keys @ q).clamp(min=0)
    delta = {"1": act[0] * values[0] + act[1] * values[1], "3": act[3] * values[3]}
    total = delta["1"] + delta["3"]
    for edit, peak, share in found:
        assert abs(share - float(delta[edit] @ total / (total @ total))) < 1e-5
        assert abs(peak - float(act[0] if edit == "1" else act[3])) < 1e-5
    assert edit_contributions(-q, keys[:2], biases[:2], values[:2], "relu-cap", ["1", "1"]) == []


def test_every_corrected_input_names_its_own_edit_and_unrelated_inputs_none(
    tmp_path: Path,
    kafka_bootstrap: str,
    kafka_topic_factory: Callable[..., str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, data = prepare(tmp_path / "tiny")
    topic = kafka_topic_factory()
    kafka_topic_factory(f"{topic}.dlq")
    tokenizer = T.AutoTokenizer.from_pretrained(base)
    plain = T.AutoModelForSequenceClassification.from_pretrained(base).eval()

    def answer(texts: list[str]) -> list[str]:
        with torch.no_grad():
            logits = plain(**tokenizer(texts, return_tensors="pt", padding=True)).logits
        return [LABELS[int(i)] for i in logits.argmax(-1)]

    rng = random.Random(31)
    texts = [sentence(rng, i) for i in range(12)]
    wrong = [next(label for label in LABELS if label != a) for a in answer(texts)]  # what the base does not say
    events = []
    for i, (text, target) in enumerate(zip(texts, wrong, strict=True)):
        for r in range(1 + i % 3):  # 1-3 reporters each
            events.append(json.dumps({"id": f"p-{i}-{r}", "model": MODEL, "input": text, "target": target,
                                      "reporter": f"reporter-{i}-{r}"}).encode())  # fmt: skip
    produce(kafka_bootstrap, topic, events)
    config = write_config(tmp_path / "c.toml", base=base, data=data, bootstrap=kafka_bootstrap, topic=topic,
                          state=tmp_path / "state")  # fmt: skip
    settings = load_settings(config, {})
    run_once(config)

    with Store.open(settings.database.url) as store:
        mistakes = {t: store.find_mistake(MODEL, fingerprint(MODEL, t)) for t in texts}
        patched = {t: m for t, m in mistakes.items() if m is not None and m.status == Status.PATCHED}
        version = store.latest_version(MODEL)
    assert len(patched) >= 8 and version is not None  # the tiny base takes most of them

    loaded = load_latest(tmp_path / "state" / "checkpoints", MODEL, base)
    assert loaded.version == version.number
    corrected = list(patched)
    answers = loaded.why(tokenizer(corrected, return_tensors="pt", padding=True))
    for text, firings in zip(corrected, answers, strict=True):
        mistake = patched[text]
        assert firings and firings[0].edit_id == mistake.id, (text, firings)  # its own edit leads
        p = firings[0].provenance
        assert (p["mistake_id"], p["target"], p["input"]) == (mistake.id, mistake.target, text)
        assert p["reporters"] == sorted(f"reporter-{texts.index(text)}-{r}" for r in range(mistake.reporter_count))
        assert p["first_version"] is not None and p["first_version"] <= loaded.version
        assert p["accepted_at"]
    heldout = [json.loads(line)["input"] for line in (data / "heldout.jsonl").read_text().splitlines()]
    unrelated = loaded.why(tokenizer(heldout, return_tensors="pt", padding=True))
    assert all(firings == [] for firings in unrelated), [f for f in unrelated if f][:3]

    # the operator's view is the same, from the same published version
    text = corrected[0]
    capsys.readouterr()  # the daemon's log lines so far
    assert patchd(["why", text, "--config", str(config), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == loaded.version and shown["answer"] == patched[text].target
    assert shown["patches"][0]["edit_id"] == patched[text].id
    assert patchd(["why", heldout[0], "--config", str(config)]) == 0
    assert "no patch fires on this input" in capsys.readouterr().out
