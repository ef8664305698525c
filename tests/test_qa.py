"""patching.bases.qa on a tiny random Llama and a byte-level tokenizer built offline (no hub, no real model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from patching.bases.qa import cut_answer, exact_match, greedy_answers, prompt_for
from tests.fixtures_models import byte_tokenizer

PROMPTS = [
    prompt_for("Which family does Epaspidoceras belong to?"),
    prompt_for("Who?"),
    prompt_for("What is the native language of Danielle Darrieux, the French actress?"),
    prompt_for("When was the inception of IAAF Combined Events Challenge?"),
    prompt_for("Which programming language is GNOME Chess written in?"),
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
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
    return LlamaForCausalLM(config).eval()


def _reference(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompt: str, steps: int) -> str:
    """The plain definition: re-run the whole sequence, append the argmax, stop at a newline."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    text = ""
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            if int(nxt) == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            text += tokenizer.decode([int(nxt)])
            if "\n" in text:
                break
    return cut_answer(text)


def test_prompt_and_exact_match() -> None:
    assert prompt_for("  Who wrote Hamlet? ") == "Question: Who wrote Hamlet?\nAnswer:"
    assert prompt_for("X", "Q: {question}\nA:") == "Q: X\nA:"
    assert exact_match(" Paris ", "Paris")
    assert not exact_match("paris", "Paris")
    assert cut_answer(" Paris.\nQuestion: next") == "Paris."


def test_tokenizer_round_trips_newlines(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "Question: a b\nAnswer: c"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_greedy_matches_reference(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    got = greedy_answers(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=1)
    assert got == [_reference(model, tokenizer, p, 12) for p in PROMPTS]


def test_batched_equals_unbatched(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    one = greedy_answers(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=1)
    for batch_size in (2, 5, 32):
        assert greedy_answers(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=batch_size) == one
    assert all("\n" not in a and a == a.strip() for a in one)
    assert tokenizer.padding_side == "right"  # the caller's setting is restored


def test_stops_at_newline(tokenizer: PreTrainedTokenizerFast) -> None:
    """A model that always writes 'A', then '\\n': the answer is 'A' however many tokens are allowed."""
    a_id = tokenizer.convert_tokens_to_ids("A")
    nl_id = tokenizer("\n")["input_ids"][0]

    class Scripted(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.calls = 0

        def forward(self, input_ids: torch.Tensor, **_: object) -> object:
            logits = torch.zeros(*input_ids.shape, len(tokenizer))
            logits[:, -1, a_id if self.calls == 0 else nl_id] = 1.0
            self.calls += 1
            return type("Out", (), {"logits": logits})()

    scripted = Scripted()
    assert greedy_answers(scripted, tokenizer, PROMPTS[:3], max_new_tokens=20) == ["A", "A", "A"]
    assert scripted.calls == 2  # stopped once every row had written its newline


def test_empty_prompt_list(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    assert greedy_answers(model, tokenizer, [], max_new_tokens=4) == []


def test_load_base_reads_a_local_directory(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    """patching.bases.load.load_base on any HF directory: kind from the architecture, answers unchanged."""
    from patching.bases.load import load_base

    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    base = load_base(str(tmp_path))
    assert base.kind == "generation" and base.labels is None and not base.model.training
    assert base.prompt_format == "Question: {question}\nAnswer:"
    want = greedy_answers(model, tokenizer, PROMPTS[:2], max_new_tokens=6)
    assert greedy_answers(base.model, base.tokenizer, PROMPTS[:2], max_new_tokens=6) == want


def test_load_base_names_the_prepare_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from patching.bases.load import load_base

    monkeypatch.setenv("PATCHD_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="patchd prepare zsre-smollm2"):
        load_base("zsre-smollm2")


def test_base_answers_are_cached_per_base_and_input_list(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TaskAdapter.base_predict: the first call decodes and writes the cache, a repeat reads it (no
    decoding), another input list or other weights miss it."""
    from patching.bases.load import load_base
    from patching.bases.tasks import TaskAdapter

    monkeypatch.setenv("PATCHD_CACHE_DIR", str(tmp_path / "cache"))
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    adapter = TaskAdapter(load_base(str(tmp_path / "base")))
    questions = ["Who?", "Which family does Epaspidoceras belong to?"]
    want = adapter.predict(questions)
    assert adapter.base_predict(questions) == want
    assert len(list((tmp_path / "cache" / "answers").glob("*.json"))) == 1

    calls: list[int] = []
    real_predict = adapter.predict
    monkeypatch.setattr(adapter, "predict", lambda xs, progress=False: calls.append(len(xs)) or real_predict(xs))
    assert adapter.base_predict(questions) == want and calls == []  # from the cache
    assert adapter.base_predict(questions[:1]) == want[:1] and calls == [1]  # another list: decoded

    with torch.no_grad():  # other weights, other identity: the old answers are not reused
        adapter.base.model.model.norm.weight.mul_(-1.0)
    adapter.base.model.save_pretrained(tmp_path / "base")
    adapter.base_predict(questions)
    assert calls == [1, 2]


def test_teacher_forced_scores_match_the_plain_definition_per_example(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    """TaskAdapter.token_accuracy, batched and padded, against the definition run one example at a
    time: prompt + " " + answer through the model, the answer's j-th token right when it is the
    argmax at the position before it."""
    from patching.bases.load import load_base
    from patching.bases.tasks import TaskAdapter
    from patching.encode import target_ids

    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    adapter = TaskAdapter(load_base(str(tmp_path / "base")))
    questions = ["Who?", "Which family does Epaspidoceras belong to?", "When?"]
    answers = ["Paris", "the Ammonoidea", "1998"]

    def plain(question: str, answer: str) -> float:
        p_ids = tokenizer(adapter.text(question))["input_ids"]
        t_ids = target_ids(tokenizer, answer, stop="")
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p_ids + t_ids])).logits[0]
        hits = [int(logits[len(p_ids) + j - 1].argmax()) == t for j, t in enumerate(t_ids)]
        return sum(hits) / len(hits)

    want = [plain(q, a) for q, a in zip(questions, answers, strict=True)]
    assert adapter.token_accuracy(questions, answers) == pytest.approx(want)
    assert adapter.token_accuracy(questions[:1], [""]) == [None]  # no answer tokens: no score


def test_a_subject_patchers_rows_come_back_from_the_disk_cache_and_train_the_same(
    tokenizer: PreTrainedTokenizerFast, model: LlamaForCausalLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TaskAdapter.patcher with trainer.subject_key: the first build writes M, the held-out rows and
    layer L_s's sequences behind both to the disk cache (a file of their own beside the plain key's);
    a fresh Patcher then takes all of them from there without a forward, and an edit trains to the
    same neurons on it as on the patcher that computed them."""
    from patching.bases.load import load_base
    from patching.bases.tasks import TaskAdapter
    from patching.config import TrainConfig
    from patching.engine import Patcher

    monkeypatch.setenv("PATCHD_CACHE_DIR", str(tmp_path / "cache"))
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    memory = [f"Which river flows through town number {i}?" for i in range(24)]
    heldout = [f"Who founded company number {i}?" for i in range(8)]
    subject = TrainConfig(subject_key=True, subject_layer=0.0)

    def patcher(train: TrainConfig) -> tuple[TaskAdapter, Patcher]:
        adapter = TaskAdapter(load_base(str(tmp_path / "base")))  # a model of its own for each Patcher
        return adapter, adapter.patcher(Patcher(adapter.base.model, train=train), memory, heldout, progress=False)

    patcher(TrainConfig(subject_key=False))
    _, built = patcher(subject)
    assert built.subject is not None and len(list((tmp_path / "cache" / "activations").iterdir())) == 2

    def computed(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the rows were computed again, not read from the cache")

    monkeypatch.setattr(TaskAdapter, "memory_batches", computed)
    monkeypatch.setattr(TaskAdapter, "heldout_batches", computed)
    adapter, loaded = patcher(subject)
    assert torch.equal(loaded.memory.view(), built.memory.view())
    assert built.heldout is not None and loaded.heldout is not None
    for name, value in vars(built.heldout).items():
        got = getattr(loaded.heldout, name)
        assert (got is None and value is None) or torch.equal(got, value), name
    want, have = built.subject_base(), loaded.subject_base()
    assert want.keys() == have.keys()
    for split in want:
        assert want[split].keys() == have[split].keys()
        assert all(torch.equal(want[split][k], have[split][k]) for k in want[split]), split

    enc = adapter.edit("Which river flows through the town of Epaspidoceras?", "Zyxw")
    a, b = built.propose(enc, "0"), loaded.propose(enc, "0")
    assert a is not None and b is not None and a.subject is not None
    assert torch.equal(a.neurons.keys, b.neurons.keys) and torch.equal(a.neurons.values, b.neurons.values)
    assert a.accepted == b.accepted
