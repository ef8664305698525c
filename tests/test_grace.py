"""GRACE (patching/eval/grace.py): the codebook rules on hand-made tensors, and the editor on a tiny
random classifier and a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from patching.eval.grace import Codebook, GraceEditor, lookup, train_values, update
from tests.test_patching_behaviour import predict, setup


def test_a_first_key_then_a_far_one_are_new_entries() -> None:
    book, action, i = update(Codebook.empty(2), torch.tensor([0.0, 0.0]), label=1, eps_init=1.0)
    assert (action, i, book.size) == ("add", 0, 1) and book.radii.tolist() == [1.0]
    book, action, i = update(book, torch.tensor([3.0, 0.0]), label=0, eps_init=1.0)  # d = 3 > 1 + 1
    assert (action, i, book.size) == ("add", 1, 2) and book.labels.tolist() == [1, 0]


def test_an_overlapping_key_with_the_same_label_expands_the_nearest_radius() -> None:
    book, _, _ = update(Codebook.empty(2), torch.tensor([0.0, 0.0]), label=1, eps_init=1.0)
    book, action, i = update(book, torch.tensor([1.5, 0.0]), label=1, eps_init=1.0)  # d = 1.5 <= 1 + 1
    assert (action, i, book.size) == ("expand", 0, 1) and book.radii.tolist() == [1.5]
    hit, idx = lookup(book, torch.tensor([[1.4, 0.0], [1.6, 0.0]]))
    assert hit.tolist() == [True, False] and idx.tolist() == [0, 0]


def test_an_overlapping_key_with_another_label_splits_both_radii_to_half_the_distance() -> None:
    book, _, _ = update(Codebook.empty(2), torch.tensor([0.0, 0.0]), label=1, eps_init=1.0)
    book, action, i = update(book, torch.tensor([0.0, 1.2]), label=0, eps_init=1.0)
    assert (action, i, book.size) == ("split", 1, 2)
    assert book.radii.tolist() == pytest.approx([0.6, 0.6]) and book.labels.tolist() == [1, 0]
    hit, idx = lookup(book, torch.tensor([[0.0, 0.5], [0.0, 0.7], [0.0, 5.0]]))
    assert hit.tolist() == [True, True, False] and idx[:2].tolist() == [0, 1]


def test_values_are_trained_until_each_row_is_right() -> None:
    head = torch.nn.Linear(4, 3)
    torch.manual_seed(0)

    def tail(ffn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return head(ffn + residual)

    ffn, residual = torch.randn(2, 4), torch.randn(2, 4)
    targets = (tail(ffn, residual).argmax(-1) + 1) % 3  # wrong now
    values, steps = train_values(ffn, residual, targets, tail)
    assert steps > 0 and torch.equal(tail(values, residual).argmax(-1), targets)


def test_the_editor_fixes_an_edit_and_leaves_inputs_outside_every_radius_alone() -> None:
    patcher, heldout, edits = setup()
    model = patcher.model
    held_before = predict(model, heldout)
    editor = GraceEditor(patcher, _ClassifierAdapter(patcher), eps_init=1e-3)
    targets = 1 - predict(model, edits[:5])
    for i in range(5):
        rec = editor.edit(edits[i : i + 1], int(targets[i]), str(i))  # type: ignore[arg-type]
        assert rec.status == "applied" and rec.neurons == 1
    assert torch.equal(predict(model, edits[:5]), targets)
    assert torch.equal(predict(model, heldout), held_before)  # a tiny radius: nothing else moves
    assert editor.summary()["entries"] == 5 and editor.summary()["actions"]["add"] == 5
    assert editor.parameters_added == 5 * (2 * patcher.site.hidden_size + 1)
    with editor.disabled():  # the overhead's baseline: the base, then the same codebook back
        assert torch.equal(predict(model, edits[:5]), 1 - targets)
    assert torch.equal(predict(model, edits[:5]), targets)
    editor.reset()
    assert torch.equal(predict(model, edits[:5]), 1 - targets)  # an empty codebook is the base
    editor.close()


class _ClassifierAdapter:
    """TaskAdapter.edit for token ids: the tiny classifier of test_patching_behaviour."""

    def __init__(self, patcher: object):
        self.patcher = patcher

    def edit(self, ids: torch.Tensor, target: int) -> object:
        from tests.test_patching_behaviour import batch

        return batch(ids, torch.tensor([target]))


def test_the_editor_on_a_generator_puts_a_key_at_every_wrong_answer_token(tmp_path: Path) -> None:
    from patching.bases.load import load_base
    from patching.bases.tasks import TaskAdapter
    from patching.engine import Patcher
    from tests.fixtures_models import tiny_llama_dir

    adapter = TaskAdapter(load_base(str(tiny_llama_dir(tmp_path))))
    editor = GraceEditor(Patcher(adapter.base.model), adapter, eps_init=1e-3)
    before = adapter.predict(["Why?", "When?"])
    rec = editor.edit("Who?", "Paris", "0")
    assert rec.status == "applied" and 1 <= rec.neurons <= len(" Paris\n")  # one key per wrong token
    assert adapter.predict(["Who?"]) == ["Paris"]  # greedy generation now writes the answer
    assert adapter.predict(["Why?", "When?"]) == before
    assert editor.edit("Who?", "Paris", "1").status == "already_fixed"
    editor.close()
