"""zsre-smollm2-qa's ingredients: ParaRel facts asked in zsRE templates, and the QA tuning loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from patching.bases.pararel import qa_examples, relation_templates
from patching.bases.qa import greedy_answers, prompt_for
from patching.bases.qa_tuning import IGNORE, QATune, answer_batch, train_answers
from patching.bases.templates import SLOT
from tests.fixtures_models import byte_tokenizer


def key(text: str) -> str:
    return text.casefold().strip()


TEMPLATES = [  # as TemplateGraph.by_use gives them: subject slot, most used first
    f"What city was {SLOT} born in?",
    f"When was {SLOT} born?",  # date of birth: must not count as place of birth
    f"In what city was {SLOT} born?",
    f"What is {SLOT}'s birthplace?",
    f"What is the record label of {SLOT}?",  # only one label template: dropped
    f"Which family does {SLOT} belong to?",  # no relation of RELATIONS
]


def test_relation_templates_keep_only_relations_with_two_phrasings() -> None:
    got = relation_templates(TEMPLATES)
    assert got == {"P19": [TEMPLATES[0], TEMPLATES[2], TEMPLATES[3]]}


@pytest.fixture()
def trex(tmp_path: Path) -> Path:
    rows = [{"sub_label": f"Person {i}", "obj_label": f"Town {i}"} for i in range(6)]
    rows.append({"sub_label": "Epaspidoceras", "obj_label": "Nowhere"})  # a zsRE subject
    (tmp_path / "P19.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return tmp_path


def test_qa_examples_ask_each_fact_in_several_phrasings_and_skip_the_task(trex: Path) -> None:
    templates = relation_templates(TEMPLATES)
    taken = {
        key("What city was Person 0 born in?"),
        key("In what city was Person 0 born?"),
        key("What is Person 0's birthplace?"),
    }
    pairs = qa_examples(
        trex, templates, skip_subjects={"epaspidoceras"}, skip_key=taken, key=key, facts=4, per_fact=2, seed=0
    )
    assert len(pairs) == 8  # 4 facts x 2 phrasings
    by_answer: dict[str, set[str]] = {}
    for question, answer in pairs:
        by_answer.setdefault(answer, set()).add(question)
    assert len(by_answer) == 4 and all(len(qs) == 2 for qs in by_answer.values())
    for answer, questions in by_answer.items():
        subject = answer.replace("Town", "Person")
        assert all(subject in q for q in questions)
    assert "Nowhere" not in by_answer  # the zsRE subject is never asked about
    assert "Town 0" not in by_answer  # every phrasing of Person 0 is a task text: the fact is skipped
    # the same seed gives the same data
    assert (
        qa_examples(
            trex, templates, skip_subjects={"epaspidoceras"}, skip_key=taken, key=key, facts=4, per_fact=2, seed=0
        )
        == pairs
    )


def test_qa_examples_name_a_missing_relation_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="P19"):
        qa_examples(tmp_path, relation_templates(TEMPLATES), skip_subjects=set(), skip_key=set(), key=key, facts=1)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


def test_answer_batch_counts_only_the_answer_and_its_newline(tokenizer: PreTrainedTokenizerFast) -> None:
    fmt = "Question: {question}\nAnswer:"
    batch = answer_batch(tokenizer, [("Who?", "Ann"), ("Where was Bo born?", "Rome")], fmt)
    prompt = len(tokenizer(prompt_for("Who?", fmt))["input_ids"])
    labels, mask = batch["labels"], batch["attention_mask"]
    assert tokenizer.decode(labels[0][labels[0] != IGNORE].tolist()) == " Ann\n"
    assert tokenizer.decode(labels[1][labels[1] != IGNORE].tolist()) == " Rome\n"
    assert (labels[0, :prompt] == IGNORE).all()
    assert int(mask[0].sum()) == prompt + len(" Ann\n") and (labels[0][mask[0] == 0] == IGNORE).all()


def test_train_answers_teaches_a_tiny_model_its_answers(tokenizer: PreTrainedTokenizerFast) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    fmt = "Question: {question}\nAnswer:"
    pairs = [
        ("Where was Ann born?", "Rome"),
        ("What city was Ann born in?", "Rome"),
        ("Where was Bo born?", "Oslo"),
        ("What city was Bo born in?", "Oslo"),
    ]
    hp = QATune(epochs=150, lr=1e-2, warmup_steps=1, batch_size=4)
    losses = train_answers(model, tokenizer, pairs, fmt, hp, seed=0, progress=False)
    assert len(losses) == 150 and losses[-1] < 0.1 * losses[0]
    assert not model.training
    answers = greedy_answers(model, tokenizer, [prompt_for(q, fmt) for q, _ in pairs], max_new_tokens=8)
    assert answers == [a for _, a in pairs]


def test_prepare_refuses_zero_facts(capsys: pytest.CaptureFixture[str]) -> None:
    from daemon import cli

    assert cli.main(["prepare", "zsre-smollm2-qa", "--facts", "0"]) == 2
    assert "--facts must be at least 1" in capsys.readouterr().out
