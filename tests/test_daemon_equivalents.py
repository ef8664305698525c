"""The worker trains a patch on the paraphrases reported with a mistake (the events' `equivalents`)."""

from __future__ import annotations

import dataclasses
import json
import random
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from daemon.model import PatchedModel
from daemon.settings import SettingsError, load_settings
from daemon.worker import Worker
from memory.store import Store
from patching.augment import with_context
from patching.encode import Encoded
from tests.test_memory_store import report
from tests.tinybase import LABELS, MISTAKE_WORDS, MODEL, llama_daemon_config, prepare, sentence, write_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return prepare(tmp_path_factory.mktemp("tiny"))


def proposed(model: PatchedModel) -> list[Encoded]:
    """The encoded edits the model's engine is asked to patch from now on (appended as they come)."""
    seen: list[Encoded] = []
    real_propose = model.patcher.propose

    def spy(enc: Encoded, edit_id: str) -> object:
        seen.append(enc)
        return real_propose(enc, edit_id)

    model.patcher.propose = spy  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("train_on_equivalents", [True, False])
def test_worker_fits_the_reported_equivalents(tiny, tmp_path: Path, train_on_equivalents: bool) -> None:
    base, data = tiny
    config = write_config(
        tmp_path / "p.toml", base=base, data=data, bootstrap="127.0.0.1:9", topic="t", state=tmp_path / "state"
    )
    settings = load_settings(config, {})
    # unrelated random inputs stand in for paraphrases here: they take more steps than real ones
    settings = dataclasses.replace(
        settings,
        policy=dataclasses.replace(settings.policy, train_on_equivalents=train_on_equivalents),
        trainer=dataclasses.replace(settings.trainer, equivalent_steps=400),
    )
    model = PatchedModel.load(settings)
    rng = random.Random(7)
    texts = [sentence(rng, i) for i in MISTAKE_WORDS]
    predicted = model.adapter.predict(texts)
    # three inputs the model gives the same label: the first is reported, the others are its "paraphrases"
    label = max(LABELS, key=predicted.count)
    same = [t for t, p in zip(texts, predicted, strict=True) if p == label][:3]
    target = next(x for x in LABELS if x != label)
    with Store.open(settings.database.url) as store:
        store.record_batch([report("ev-0", same[0], target, model=MODEL, equivalents=tuple(same[1:]))])
        mistake = store.next_mistake(MODEL)
        assert mistake is not None and mistake.equivalents == tuple(same[1:])
        worker = Worker(store, model, settings.policy, work_allowed=threading.Event(), ingest_done=threading.Event())
        assert worker.process(mistake) == "patched"
    after = model.adapter.predict(same)
    assert after[0] == target
    if train_on_equivalents:
        assert after[1:] == [target, target]
    else:  # one neuron for the reported wording only: unrelated inputs keep their label
        assert after[1:] == [label, label]


def test_worker_trains_behind_the_context_prefixes(tiny, tmp_path: Path) -> None:
    """[policy] context_prefixes = 2: the prefixes are the last two memory inputs, and the engine gets
    the patch's input behind each of them as training rows (issue 21's context augmentation; whether
    they generalise is measured on the real base, docs/results/levers-21.md)."""
    base, data = tiny
    config = write_config(
        tmp_path / "p.toml", base=base, data=data, bootstrap="127.0.0.1:9", topic="t", state=tmp_path / "state"
    )
    unset = load_settings(config, {})
    assert unset.policy.context_prefixes is None and PatchedModel.load(unset).prefixes == []  # a classifier: none
    settings = load_settings(config, {"PATCHD_POLICY_CONTEXT_PREFIXES": "2"})
    assert settings.policy.context_prefixes == 2 and settings.policy.context_prefix_source == "memory"
    model = PatchedModel.load(settings)
    memory = [json.loads(line)["input"] for line in (data / "memory.jsonl").read_text().splitlines() if line.strip()]
    assert model.prefixes == memory[-2:]
    text = sentence(random.Random(11), MISTAKE_WORDS[0])
    target = next(x for x in LABELS if x != model.adapter.predict([text])[0])
    seen = proposed(model)
    with Store.open(settings.database.url) as store:
        store.record_batch([report("ev-0", text, target, model=MODEL, equivalents=("a paraphrase",))])
        mistake = store.next_mistake(MODEL)
        assert mistake is not None
        prefixed = [with_context(p, text) for p in memory[-2:]]
        assert model.training_texts(mistake, ["a paraphrase"]) == ["a paraphrase", *prefixed]
        worker = Worker(store, model, settings.policy, work_allowed=threading.Event(), ingest_done=threading.Event())
        assert worker.process(mistake) == "patched"
    want = model.adapter.edit(text, target, ["a paraphrase", *prefixed]).batch["input_ids"]
    assert len(seen) == 1 and seen[0].size == 4 and torch.equal(seen[0].batch["input_ids"], want)
    assert model.adapter.predict([text]) == [target]
    assert model.chat_copies == 0  # a classifier has no chat form
    with pytest.raises(SettingsError, match="policy.context_chat_copies = 2: needs a generator"):
        PatchedModel.load(load_settings(config, {"PATCHD_POLICY_CONTEXT_CHAT_COPIES": "2"}))


def test_chat_copies_where_the_base_can_train_them_and_the_default_only_there() -> None:
    from types import SimpleNamespace

    from daemon.model import CHAT_COPIES, _chat_copies

    def adapter(generation: bool, template: str | None) -> Any:
        return SimpleNamespace(
            generation=generation, base=SimpleNamespace(tokenizer=SimpleNamespace(chat_template=template))
        )

    chat = adapter(True, "{{ messages }}")
    assert _chat_copies(None, chat, ["a prefix"]) == CHAT_COPIES and _chat_copies(3, chat, ["a prefix"]) == 3
    for unusable in (adapter(True, None), adapter(False, None)):
        assert _chat_copies(None, unusable, ["a prefix"]) == 0 and _chat_copies(0, unusable, ["a prefix"]) == 0
        with pytest.raises(SettingsError, match="policy.context_chat_copies"):
            _chat_copies(1, unusable, ["a prefix"])
    assert _chat_copies(None, chat, []) == 0  # no prefixes: no earlier questions
    with pytest.raises(SettingsError, match="context prefixes"):
        _chat_copies(2, chat, [])


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"PATCHD_POLICY_CONTEXT_PREFIXES": "65"}, "policy.context_prefixes"),
        ({"PATCHD_POLICY_CONTEXT_PREFIX_SOURCE": "web"}, "context_prefix_source"),
        ({"PATCHD_POLICY_CONTEXT_CHAT_COPIES": "-1"}, "policy.context_chat_copies"),
    ],
)
def test_a_bad_context_prefix_setting_names_its_key(tmp_path: Path, env: dict[str, str], key: str) -> None:
    from daemon.settings import SettingsError

    with pytest.raises(SettingsError, match=key):
        load_settings(None, env)


def test_a_chat_template_generator_trains_each_patch_in_its_chat_forms_by_default(tmp_path: Path) -> None:
    """Unset policy on a tiny random Llama whose tokenizer has a chat template: the worker's engine
    gets the edit, its input behind the 10 memory prefixes and CHAT_COPIES chat forms (their earlier
    questions being prefixes), encoded as sent, and the patch fixes the edit."""
    from daemon.model import CHAT_COPIES, GENERATOR_PREFIXES
    from patching.prompt import Prompt

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    config, _base = llama_daemon_config(tmp_path, 40, template)
    settings = load_settings(config, {})
    assert settings.policy.context_chat_copies is None
    model = PatchedModel.load(settings)
    assert model.chat_copies == CHAT_COPIES and len(model.prefixes) == GENERATOR_PREFIXES
    seen = proposed(model)
    question, target = "Where is Rome?", "1"
    assert model.adapter.predict([question]) != [target]
    with Store.open(settings.database.url) as store:
        store.record_batch([report("ev-0", question, target, model=MODEL)])
        mistake = store.next_mistake(MODEL)
        assert mistake is not None
        texts = model.training_texts(mistake)
        chats = texts[GENERATOR_PREFIXES:]
        assert texts[:GENERATOR_PREFIXES] == [with_context(p, question) for p in model.prefixes]
        assert len(chats) == CHAT_COPIES and all(isinstance(c, Prompt) for c in chats)
        asked = model.adapter.text(question)
        assert all(c.endswith(f"[user] {asked}\n[assistant]") for c in chats)
        assert all(any(f"[user] {p}\n" in c for p in model.prefixes) for c in chats)
        worker = Worker(store, model, settings.policy, work_allowed=threading.Event(), ingest_done=threading.Event())
        assert worker.process(mistake) == "patched"
    (enc,) = seen
    assert enc.size == 1 + GENERATOR_PREFIXES + CHAT_COPIES
    tok = model.base.tokenizer
    for i, chat in enumerate(chats, start=1 + GENERATOR_PREFIXES):  # each chat form encoded as it is
        ids = tok(str(chat))["input_ids"]
        assert enc.batch["input_ids"][i, : len(ids)].tolist() == ids
    assert model.adapter.predict([question]) == [target]
