"""WISE (patching/eval/wise.py): routing, its margin loss and the TIES merge on hand-made tensors,
and the editor on a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from patching.eval.deepsite import replay_logits
from patching.eval.wise import WiseConfig, WiseEditor, margin_loss, parse_settings, route, route_scores, ties_merge


def test_a_sequences_score_is_the_mean_norm_of_the_side_memorys_change_over_its_real_positions() -> None:
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])  # [B=1, T=3, d_ff=2]
    delta = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # [d_model=2, d_ff=2]: only the first unit changed
    # per position ||a delta^T|| = 1, 0, 5; the third position is padding
    assert route_scores(a, delta, torch.tensor([[1, 1, 0]])).tolist() == [0.5]
    assert route_scores(a, delta, None).tolist() == [2.0]


def test_the_margin_loss_is_zero_only_when_edits_and_unrelated_inputs_are_apart() -> None:
    ok = margin_loss(torch.tensor([25.0, 30.0]), torch.tensor([2.0]), alpha=5.0, beta=20.0, gamma=10.0)
    assert float(ok) == 0.0
    # an unrelated input above alpha, an edit below beta, and the two closer than gamma: each costs
    assert float(margin_loss(torch.tensor([25.0]), torch.tensor([7.0]), 5.0, 20.0, 10.0)) == pytest.approx(2.0)
    assert float(margin_loss(torch.tensor([18.0]), torch.tensor([2.0]), 5.0, 20.0, 10.0)) == pytest.approx(2.0)
    assert float(margin_loss(torch.tensor([21.0]), torch.tensor([4.0]), 5.0, 20.0, 20.0)) == pytest.approx(3.0)


def test_a_sequence_below_the_threshold_on_both_side_memories_goes_to_the_main_memory() -> None:
    merged = torch.tensor([0.1, 3.0, 1.0, -float("inf")])
    current = torch.tensor([0.2, 1.0, 4.0, 2.0])
    # threshold 0.5: the first stays main; else the higher-scoring side memory (1 merged, 2 current)
    assert route(merged, current, 0.5).tolist() == [0, 1, 2, 2]


def test_ties_trims_elects_a_sign_per_entry_and_averages_the_agreeing_changes() -> None:
    base = torch.zeros(4)
    m1, m2 = torch.tensor([3.0, -1.0, 0.0, 2.0]), torch.tensor([1.0, 2.0, 0.0, -4.0])
    # no trim: weighted changes [1.5, -0.5, 0, 1] and [0.5, 1, 0, -2]; signs of the sums: +, +, 0, -;
    # entry 1 keeps only m2's +2, entry 3 only m2's -4 (the weighted mean of the agreeing ones)
    assert ties_merge(base, [m1, m2], [0.5, 0.5], density=1.0).tolist() == [2.0, 2.0, 0.0, -4.0]
    # density 0.5 keeps each change's two largest: m1 -> [3, 0, 0, 2], m2 -> [0, 2, 0, -4]
    assert ties_merge(base, [m1, m2], [0.5, 0.5], density=0.5).tolist() == [3.0, 2.0, 0.0, -4.0]
    # merged into a non-zero base: the change is added to it
    assert ties_merge(torch.ones(4), [m1 + 1, m2 + 1], [0.5, 0.5], 1.0).tolist() == [3.0, 3.0, 1.0, -3.0]


def test_settings_from_the_command_line_are_typed_and_unknown_ones_are_named() -> None:
    assert parse_settings(["steps=30", "alpha=2.5"]) == {"steps": 30, "alpha": 2.5}
    with pytest.raises(ValueError, match="bogus"):
        parse_settings(["bogus=1"])
    with pytest.raises(ValueError, match="steps"):
        parse_settings(["steps=many"])


def _tiny(tmp_path: Path, **config: object) -> tuple[object, WiseEditor]:
    from patching.bases.load import load_base
    from patching.bases.tasks import TaskAdapter
    from tests.fixtures_models import tiny_llama_dir

    adapter = TaskAdapter(load_base(str(tiny_llama_dir(tmp_path))))
    return adapter, WiseEditor(adapter, ["Where is it?", "How are you?"], WiseConfig(**config))  # type: ignore[arg-type]


def test_an_unrelated_input_goes_to_the_main_memory_and_an_edited_one_to_the_side_memory(tmp_path: Path) -> None:
    adapter, editor = _tiny(tmp_path, prefixes=1)
    model = adapter.base.model  # type: ignore[attr-defined]
    enc = adapter.serving_batch(["Who?", "Why?"])  # type: ignore[attr-defined]
    with torch.no_grad():
        base = model(**enc).logits
    # a side memory that changes only what the first unit of the activation feeds
    a, _ = editor._capture({k: v for k, v in enc.items() if k != "logits_to_keep"})
    unit = int(a[0, -1].abs().argmax())  # the unit "Who?" drives hardest at its last position
    editor.current = editor.main.clone()
    editor.current[:, unit] += 50.0
    scores = route_scores(a, editor.current - editor.main, enc["attention_mask"])
    editor.min_score = float(scores.max()) / editor.config.act_ratio  # threshold = the higher score
    with torch.no_grad():
        out = model(**enc).logits
    routed = route(torch.full_like(scores, -float("inf")), scores, editor.threshold)
    for row in range(2):
        if routed[row] == 0:  # below the threshold: the main memory, bit for bit
            assert torch.equal(out[row], base[row])
        else:
            assert not torch.allclose(out[row], base[row])
    assert routed.tolist().count(0) == 1  # one of the two goes to each memory
    with editor.disabled(), torch.no_grad():  # the overhead's baseline: the base
        assert torch.equal(model(**enc).logits, base)
    editor.reset()
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, base)
    editor.close()


def test_the_editor_makes_an_edit_right_and_shards_and_merges_on_schedule(tmp_path: Path) -> None:
    # the tiny random model's activations are ~0.004: the margins are scaled to it, and every
    # entry is trainable (mask_ratio 1) so that a 32 x 64 side memory can learn an answer
    adapter, editor = _tiny(
        tmp_path, prefixes=1, mask_ratio=1.0, alpha=1.0, beta=0.0, gamma=0.0, steps=300, lr=0.5,
        norm_constraint=5.0, shard_edits=1, merge_edits=2,
    )  # fmt: skip
    rec = editor.edit("Who?", "Paris", "0")
    # right under teacher forcing, the sequence it was trained on (prompt and answer): its score is
    # the edit's own, above the threshold. Greedy generation routes on the prompt alone, which may
    # score lower: WISE's published gap between the two scorings (arXiv 2502.11177)
    assert rec.status == "applied" and adapter.token_accuracy(["Who?"], ["Paris"]) == [1.0]  # type: ignore[attr-defined]
    # trained through the frozen stack: no weight gradient computed on the base, the flags restored
    assert all(p.grad is None and p.requires_grad for p in adapter.base.model.parameters())  # type: ignore[attr-defined]
    # shard_edits 1: the edit became a shard and the current side memory starts again from W
    assert len(editor.shards) == 1 and torch.equal(editor.current, editor.main) and editor.merged is None
    editor.edit("Which?", "Rome", "1")
    assert editor.shards == [] and editor.merged is not None and editor.merges == 1  # merged by TIES
    summary = editor.summary()
    assert summary["edits"] == 2 and summary["merges"] == 1 and summary["threshold"] > 0
    assert editor.parameters_added == editor.main.numel()  # the merged side memory
    editor.close()


def test_a_stream_resumed_from_the_saved_state_trains_shards_and_merges_as_the_uninterrupted_one(
    tmp_path: Path,
) -> None:
    from patching.eval.editorstate import read_state, write_state

    cfg = {"prefixes": 1, "mask_ratio": 0.5, "steps": 5, "shard_edits": 2, "merge_edits": 4}
    edits = [("Who?", "Paris"), ("Which?", "Rome"), ("Why?", "Oslo"), ("How?", "Bern"), ("When?", "Kiev")]
    _, whole = _tiny(tmp_path, **cfg)
    for i, (inp, target) in enumerate(edits):
        whole.edit(inp, target, str(i))
    end = whole.state()
    whole.close()
    _, first = _tiny(tmp_path, **cfg)
    for i, (inp, target) in enumerate(edits[:3]):  # stopped inside the second shard
        first.edit(inp, target, str(i))
    write_state(tmp_path / "wise.state.safetensors", first.state())
    first.close()
    _, resumed = _tiny(tmp_path, **cfg)
    resumed.load_state(read_state(tmp_path / "wise.state.safetensors"))
    for i, (inp, target) in enumerate(edits[3:], start=3):
        resumed.edit(inp, target, str(i))
    again = resumed.state()
    assert again.meta == end.meta and again.meta["merges"] == 1 and again.meta["shards"] == 0
    assert again.tensors.keys() == end.tensors.keys()
    assert all(torch.equal(again.tensors[k], end.tensors[k]) for k in end.tensors)
    resumed.close()


def test_a_classifier_is_refused_with_a_clear_error() -> None:
    from tests.test_patching_behaviour import setup

    patcher, _, _ = setup()

    class Adapter:
        generation = False

    with pytest.raises(ValueError, match="causal LM"):
        WiseEditor(Adapter(), ["x"])  # type: ignore[arg-type]
    del patcher


def test_the_training_steps_cached_layers_give_the_full_models_logits(tmp_path: Path) -> None:
    """A step runs only the layers from the side memory's on, from hidden states captured once:
    the target rows' logits must be the full forward's."""
    adapter, editor = _tiny(tmp_path, prefixes=1)
    enc = adapter.edit("Who?", "Paris", ["It is late. Who?"])  # type: ignore[attr-defined]
    with torch.no_grad():
        full = adapter.base.model(**enc.batch).logits[enc.rows_b, enc.rows_t]  # type: ignore[attr-defined]
        editor.editing = True  # the side memory in place everywhere, as in training
        editor.current = editor.main + 0.5  # and a changed one, so the layer's output counts
        cached = replay_logits(editor.site, editor._capture(enc.batch)[1], enc.rows_b, enc.rows_t)  # type: ignore[attr-defined]
        changed = adapter.base.model(**enc.batch).logits[enc.rows_b, enc.rows_t]  # type: ignore[attr-defined]
    editor.editing = False
    assert torch.allclose(cached, changed, atol=1e-5) and not torch.allclose(changed, full, atol=1e-3)
    editor.close()
