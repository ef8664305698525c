"""Every input form and every architecture kind the daemon promises, end to end on the real broker:
a text-pair classifier (NLI-style `{"text", "text_pair"}` events) and encoder-decoder generators
(tiny random bart and t5), each through `patchd run --once` and a restart that replays the patches.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as T

from daemon.model import PatchedModel
from daemon.settings import load_settings
from memory.fingerprint import fingerprint
from memory.lifecycle import Status
from memory.store import Store
from tests.fixtures_models import byte_tokenizer
from tests.tinybase import LABELS, WORDS, prepare, produce, run_once, sentence, write_config

DONE = {Status.PATCHED, Status.GATE_REJECTED, Status.ALREADY_FIXED}


def _run(config: Path, model: str) -> tuple[dict[Status, int], object]:
    service = run_once(config)
    with Store.open(service.settings.database.url) as store:
        return store.status_counts(model), service


def _final(store: Store, model: str, inputs: list[object]) -> dict[int, tuple[object, Status]]:
    """mistake id -> (its stored input, status), for each event input in order."""
    out = {}
    for value in inputs:
        key = (value["text"], value["text_pair"]) if isinstance(value, dict) else value
        mistake = store.find_mistake(model, fingerprint(model, key))
        assert mistake is not None
        out[mistake.id] = (mistake.input, mistake.status)
    return out


def test_text_pair_classifier_end_to_end(
    tmp_path: Path, kafka_bootstrap: str, kafka_topic_factory: Callable[..., str]
) -> None:
    base, _ = prepare(tmp_path / "tiny")
    rng = random.Random(5)
    data = tmp_path / "pairs"
    data.mkdir()
    # memory and held-out sets of the same form: premise-like first texts, hypothesis-like second ones
    for name, firsts in (("memory", range(100, 220)), ("heldout", range(220, 300))):
        lines = [{"input": {"text": sentence(rng, i), "text_pair": sentence(rng, 300 + i % 100)}} for i in firsts]
        (data / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    topic = kafka_topic_factory()
    kafka_topic_factory(f"{topic}.dlq")
    inputs = [{"text": sentence(rng, i), "text_pair": " ".join(rng.choices(WORDS[300:], k=5))} for i in range(30)]
    events = [
        {"id": f"pair-{i}", "model": "tiny", "input": value, "target": rng.choice(LABELS), "reporter": "r"}
        for i, value in enumerate(inputs)
    ]
    produce(kafka_bootstrap, topic, [json.dumps(e).encode() for e in events])
    config = write_config(
        tmp_path / "pairs.toml", base=base, data=data, bootstrap=kafka_bootstrap, topic=topic, state=tmp_path / "state"
    )
    counts, _ = _run(config, "tiny")
    assert counts[Status.FAILED] == counts[Status.QUEUED] == counts[Status.PATCHING] == 0
    assert sum(counts[s] for s in DONE) == len(events)
    assert counts[Status.PATCHED] > 0, "a random classifier gets about half of random targets wrong"

    settings = load_settings(config, {})
    targets = {json.dumps(e["input"], sort_keys=True): e["target"] for e in events}
    with Store.open(settings.database.url) as store:
        final = _final(store, "tiny", inputs)
        # the input reached the store, and so the engine, as the pair the producer sent
        assert all(isinstance(value, tuple) and len(value) == 2 for value, _ in final.values())
        model = PatchedModel.load(settings)
        rebuilt = model.rebuild(store)
    patched = [value for value, status in final.values() if status == Status.PATCHED]
    assert rebuilt.replayed + rebuilt.restored == len(patched) and rebuilt.mismatches == []
    expected = [targets[json.dumps({"text": t, "text_pair": p}, sort_keys=True)] for t, p in patched]
    assert model.adapter.predict(patched) == expected


def _seq2seq_base(directory: Path, arch: str) -> Path:
    """A tiny random encoder-decoder with a byte-level tokenizer, saved as a local HF directory."""
    tok = byte_tokenizer()
    vocab, pad, eos = len(tok), tok.pad_token_id, tok.eos_token_id
    torch.manual_seed(0)
    if arch == "bart":
        model: T.PreTrainedModel = T.BartForConditionalGeneration(
            T.BartConfig(
                vocab_size=vocab,
                d_model=64,
                encoder_layers=1,
                decoder_layers=2,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=128,
                decoder_ffn_dim=128,
                max_position_embeddings=128,
                pad_token_id=pad,
                bos_token_id=eos,
                eos_token_id=eos,
                decoder_start_token_id=eos,
                forced_eos_token_id=None,
            )
        )
    else:  # equal encoder and decoder depth: transformers' t5 cache assumes it in generate()
        model = T.T5ForConditionalGeneration(
            T.T5Config(
                vocab_size=vocab,
                d_model=64,
                d_kv=16,
                d_ff=128,
                num_layers=2,
                num_decoder_layers=2,
                num_heads=2,
                pad_token_id=pad,
                eos_token_id=eos,
                decoder_start_token_id=pad,
            )
        )
    out = directory / f"tiny-{arch}"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_seq2seq_generator_end_to_end(
    arch: str, tmp_path: Path, kafka_bootstrap: str, kafka_topic_factory: Callable[..., str]
) -> None:
    base = _seq2seq_base(tmp_path, arch)
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]

    def question() -> str:
        return " ".join(rng.choice(words) for _ in range(4))

    data = tmp_path / "data"
    data.mkdir()
    for name, n in (("memory", 60), ("heldout", 30)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps({"input": question()}) + "\n" for _ in range(n)))
    questions = list(dict.fromkeys(question() for _ in range(8)))[:6]
    events = [
        {"id": f"q-{i}", "model": arch, "input": q, "target": rng.choice("abc"), "reporter": "r"}
        for i, q in enumerate(questions)
    ]
    topic = kafka_topic_factory()
    kafka_topic_factory(f"{topic}.dlq")
    produce(kafka_bootstrap, topic, [json.dumps(e).encode() for e in events])
    config = write_config(
        tmp_path / "s2s.toml",
        base=base,
        data=data,
        bootstrap=kafka_bootstrap,
        topic=topic,
        state=tmp_path / "state",
        model=arch,
    )
    counts, _ = _run(config, arch)
    assert counts[Status.FAILED] == counts[Status.QUEUED] == counts[Status.PATCHING] == 0
    assert sum(counts[s] for s in DONE) == len(events)
    assert counts[Status.PATCHED] > 0

    settings = load_settings(config, {})
    with Store.open(settings.database.url) as store:
        final = _final(store, arch, questions)
        model = PatchedModel.load(settings)
        assert model.adapter.seq2seq and model.base.kind == "generation"
        # context_prefixes unset: a generator's patches train behind 10 memory texts (the last ones)
        memory = [json.loads(line)["input"] for line in (data / "memory.jsonl").read_text().splitlines()]
        assert model.prefixes == list(dict.fromkeys(memory[::-1]))[:10][::-1]
        rebuilt = model.rebuild(store)
    patched = [value for value, status in final.values() if status == Status.PATCHED]
    assert rebuilt.replayed + rebuilt.restored == len(patched) and rebuilt.mismatches == []
    target = {e["input"]: e["target"] for e in events}
    assert model.adapter.predict(patched) == [target[q] for q in patched]


def test_a_bfloat16_base_through_the_daemon_and_a_restart(
    tmp_path: Path, kafka_bootstrap: str, kafka_topic_factory: Callable[..., str]
) -> None:
    """[model] dtype = "bfloat16": the daemon patches a bfloat16 base, stores float32 neurons, and a
    restart replays them into a bfloat16 model that answers every patched mistake."""
    from patching import patchfile

    base, data = prepare(tmp_path / "tiny")
    rng = random.Random(11)
    topic = kafka_topic_factory()
    kafka_topic_factory(f"{topic}.dlq")
    inputs = [sentence(rng, i) for i in range(20)]
    events = [
        {"id": f"bf16-{i}", "model": "tiny", "input": text, "target": rng.choice(LABELS), "reporter": "r"}
        for i, text in enumerate(inputs)
    ]
    produce(kafka_bootstrap, topic, [json.dumps(e).encode() for e in events])
    config = write_config(
        tmp_path / "bf16.toml", base=base, data=data, bootstrap=kafka_bootstrap, topic=topic, state=tmp_path / "state"
    )
    config.write_text(config.read_text().replace("[model]\n", '[model]\ndtype = "bfloat16"\n', 1))
    counts, _ = _run(config, "tiny")
    assert counts[Status.FAILED] == 0 and sum(counts[s] for s in DONE) == len(events)
    assert counts[Status.PATCHED] > 0, "a random classifier gets about half of random targets wrong"

    settings = load_settings(config, {})
    targets = {e["input"]: e["target"] for e in events}
    with Store.open(settings.database.url) as store:
        final = _final(store, "tiny", inputs)
        stored = [p for p in store.accepted_patches("tiny")]
        assert stored and all(patchfile.decode(p.neurons).keys.dtype == torch.float32 for p in stored)
        model = PatchedModel.load(settings)
        rebuilt = model.rebuild(store)
    assert next(model.patcher.model.parameters()).dtype == torch.bfloat16
    assert model.patcher.wrapper.keys.dtype == torch.float32
    patched = [value for value, status in final.values() if status == Status.PATCHED]
    assert rebuilt.replayed + rebuilt.restored == len(patched) and rebuilt.mismatches == []
    assert model.adapter.predict(patched) == [targets[t] for t in patched]
