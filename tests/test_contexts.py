"""Context texts for cr / cgr (patching/eval/contexts.py): composed as said, disjoint from every text
an editor trains on, in the built-in tasks and in the generic format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from patching.augment import with_context
from patching.bases.datasets import Example, text_key
from patching.eval.contexts import CONTEXT_POOL, chat_prompt, contexts_for, pool_from_memory
from patching.eval.evaldata import DataError, EvalData, load_eval_data, load_generic
from tests.fixtures_models import byte_tokenizer, tiny_llama_dir


def test_contexts_rotate_through_the_pool_and_an_edits_own_come_first() -> None:
    pool = ["a.", "b.", "c.", "d.", "e."]
    assert contexts_for(0, (), pool, k=3) == ["a.", "b.", "c."]
    assert contexts_for(1, (), pool, k=3) == ["d.", "e.", "a."]
    assert contexts_for(7, ("mine.",), pool) == ["mine."]
    assert contexts_for(0, (), []) == []
    assert with_context(" Tilda Swinton is a vegan. ", "Which war did Milton F. Pavlic serve in? ") == (
        "Tilda Swinton is a vegan. Which war did Milton F. Pavlic serve in?"
    )


def test_the_pool_is_the_end_of_the_memory_part_at_most_a_tenth_of_it() -> None:
    memory = [Example(f"m{i}", "") for i in range(50)]
    kept, pool = pool_from_memory(memory, size=100)
    assert pool == [f"m{i}" for i in range(45, 50)] and [m.input for m in kept] == [f"m{i}" for i in range(45)]
    kept, pool = pool_from_memory(memory[:9])
    assert pool == [] and len(kept) == 9


def test_the_chat_form_puts_the_prompt_last_after_a_system_prompt_and_an_earlier_turn() -> None:
    tok = byte_tokenizer()
    assert chat_prompt(tok, "Question: Who?\nAnswer:", "Tilda Swinton is a vegan.") is None  # no template
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    text = chat_prompt(tok, "Question: Who?\nAnswer:", "Tilda Swinton is a vegan.")
    assert text is not None and text.startswith("<system>") and text.endswith("Question: Who?\nAnswer:\n<assistant>")
    assert text.index("Tilda Swinton is a vegan.") < text.index("Question: Who?")


def test_chat_copies_rotate_training_turns_that_cr_chat_never_asks_with() -> None:
    from patching.augment import TRAIN_SYSTEMS, chat_copies
    from patching.eval.contexts import EARLIER_REPLY, SYSTEM_PROMPT
    from patching.prompt import Prompt

    tok = byte_tokenizer()
    prefixes = ["It rained.", "Cats purr.", "Snow is cold."]
    assert chat_copies(tok, "Question: Who?\nAnswer:", prefixes, 2) == []  # no template
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    first, second = (chat_copies(tok, "Question: Who?\nAnswer:", prefixes, 2, offset=k) for k in (0, 1))
    assert len(first) == 2 and all(isinstance(c, Prompt) for c in first + second)
    assert all(c.endswith("<user>Question: Who?\nAnswer:\n<assistant>") for c in first + second)
    # earlier questions are the prefixes, rotating with the edit's number: edit 1 goes on from edit 0
    assert [p for c in first + second for p in prefixes if f"<user>{p}" in c] == [*prefixes, prefixes[0]]
    assert not first[0].startswith("<system>") and first[1].startswith(f"<system>{TRAIN_SYSTEMS[1]}")
    assert not any(SYSTEM_PROMPT in c or EARLIER_REPLY in c for c in first + second)
    assert chat_copies(tok, "Question: Who?\nAnswer:", [], 2) == []


def test_a_chat_copy_is_encoded_as_it_is_without_the_question_format(tmp_path: Path) -> None:
    from patching.augment import chat_copies
    from patching.bases.load import load_base
    from patching.bases.tasks import TaskAdapter

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    adapter = TaskAdapter(load_base(str(tiny_llama_dir(tmp_path, template))))
    (copy,) = chat_copies(adapter.base.tokenizer, adapter.text("Who?"), ["It rained."], 1)
    assert adapter.text(copy) == copy and adapter.text("Who?") != "Who?"
    enc = adapter.edit("Who?", "Paris", [copy])
    tok = adapter.base.tokenizer
    prompt_ids = tok(str(copy))["input_ids"]
    assert enc.batch["input_ids"][1, : len(prompt_ids)].tolist() == prompt_ids  # example 1: the chat form


@pytest.mark.parametrize("task", ["fever", "zsre", "counterfact"])
def test_built_in_context_texts_are_nothing_an_editor_trains_on(task: str) -> None:
    data = load_eval_data(task)
    assert len(data.context_pool) == CONTEXT_POOL
    trained = {text_key(m.input) for m in data.memory}
    for e in data.edits:
        trained.update(text_key(t) for t in (e.input, *e.train_equivalents))
    measured = {text_key(t) for e in data.edits for t in e.equivalents} | {text_key(h.input) for h in data.heldout}
    pool = {text_key(c) for c in data.context_pool}
    assert len(pool) == CONTEXT_POOL and not pool & trained and not pool & measured


def write(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_generic_contexts_are_read_and_one_an_editor_trains_on_is_refused(tmp_path: Path) -> None:
    write(
        tmp_path / "edits.jsonl",
        [
            {"input": "Who?", "target": "Paris", "contexts": ["It rained today.", "Cats purr."]},
            {"input": "When?", "target": "1998"},
        ],
    )
    write(tmp_path / "memory.jsonl", [{"input": f"memory text {i}"} for i in range(40)])
    data: EvalData = load_generic(tmp_path)
    assert data.edits[0].contexts == ("It rained today.", "Cats purr.") and data.edits[1].contexts == ()
    assert data.context_pool == [f"memory text {i}" for i in range(36, 40)] and len(data.memory) == 36
    write(tmp_path / "edits.jsonl", [{"input": "Who?", "target": "Paris", "contexts": ["memory text 3"]}])
    with pytest.raises(DataError, match="context 'memory text 3' is also an edit, train equivalent or memory"):
        load_generic(tmp_path)
    write(tmp_path / "edits.jsonl", [{"input": "Who?", "target": "Paris", "contexts": "not a list"}])
    with pytest.raises(DataError, match="'neighbours' must be lists of strings"):
        load_generic(tmp_path)


def test_a_generator_with_a_chat_template_is_asked_in_it_too(tmp_path: Path) -> None:
    """_in_context on a tiny random Llama: cr over the edit's 2 contexts, cgr over its paraphrase,
    cr_chat from the chat form (0 or 1: one prompt), each matching a direct greedy answer."""
    from patching.bases.load import load_base
    from patching.bases.tasks import TaskAdapter
    from patching.eval.evaluate import _in_context

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    adapter = TaskAdapter(load_base(str(tiny_llama_dir(tmp_path, template))))
    question, paraphrase = "Who?", "Which one?"
    contexts = ["It rained today.", "Cats purr."]
    # the target is what the model answers behind the first context: cr is at least 1/2
    target = adapter.predict([with_context(contexts[0], question)])[0]
    ex = Example(question, target, (paraphrase,))
    got = _in_context(adapter, ex, contexts)
    want_cr = [adapter.right(a, target) for a in adapter.predict([with_context(c, question) for c in contexts])]
    assert got["cr"] == sum(want_cr) / 2 >= 0.5
    # each miss names its context and the answer given behind it
    assert [m["context"] for m in got["cr_missed"]] == [c for c, ok in zip(contexts, want_cr, strict=True) if not ok]
    assert all(not adapter.right(m["answer"], target) for m in got["cr_missed"])
    assert got["cgr"] == float(adapter.right(adapter.predict([with_context(contexts[0], paraphrase)])[0], target))
    chat = chat_prompt(adapter.base.tokenizer, adapter.text(question), contexts[0])
    assert chat is not None and got["cr_chat"] == float(adapter.right(adapter.predict_prompts([chat])[0], target))
    assert _in_context(adapter, ex, []) == {"cr": None, "cgr": None, "cr_chat": None}


def test_context_augmentation_trains_each_edit_behind_memory_prefixes_never_the_measured_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from patching.eval.editors import TPatcherEditor
    from patching.eval.evaluate import run_evaluate
    from tests.test_evaluate import tiny_data
    from tests.tinybase import tiny_base

    seen: list[tuple[str, tuple[str, ...]]] = []
    real_edit = TPatcherEditor.edit

    def spy(
        self: TPatcherEditor, inp: str, target: str, edit_id: str, train_equivalents: tuple[str, ...] = ()
    ) -> object:
        seen.append((inp, tuple(train_equivalents)))
        return real_edit(self, inp, target, edit_id, train_equivalents)

    monkeypatch.setattr(TPatcherEditor, "edit", spy)
    data = load_eval_data(str(tiny_data(tmp_path)))
    report = run_evaluate(str(tiny_base(tmp_path)), data, edits=4, context_augment=2, progress=lambda _msg: None)
    prefixes = report["augment_prefixes"]
    assert prefixes == [m.input for m in data.memory[-2:]] and not set(prefixes) & set(data.context_pool)
    assert report["context_augment"] == 2 and report["sr"] == 1.0
    assert len(seen) == report["edits"]
    for inp, trained in seen:  # every edit trained behind both prefixes, and on nothing else
        assert trained == tuple(with_context(c, inp) for c in prefixes)
    with pytest.raises(ValueError, match="--chat-copies needs a generator whose tokenizer has a chat template"):
        run_evaluate(str(tiny_base(tmp_path)), data, edits=1, context_augment=2, chat_copies=1, progress=print)


def test_a_generators_prefixes_are_its_own_continuations_of_seed_words(tmp_path: Path) -> None:
    from patching.augment import AUGMENT_SEEDS, augment_prefixes
    from patching.bases.load import load_base
    from patching.bases.tasks import TaskAdapter

    adapter = TaskAdapter(load_base(str(tiny_llama_dir(tmp_path))))
    prefixes = augment_prefixes(adapter, ["unused"], 3, source="generated")
    assert len(prefixes) == 3 and all(p.startswith(s) for p, s in zip(prefixes, AUGMENT_SEEDS, strict=False))
    assert all("\n" not in p for p in prefixes) and augment_prefixes(adapter, [], 0, source="generated") == []
    # the default source: the last memory texts, a pair's first text, no blank or repeated one
    memory = ["a b", ("claim", "evidence"), "  ", "a b", "last"]
    assert augment_prefixes(adapter, memory, 3) == ["claim", "a b", "last"]
    with pytest.raises(ValueError, match="prefix source 'web'"):
        augment_prefixes(adapter, memory, 1, source="web")  # type: ignore[arg-type]
