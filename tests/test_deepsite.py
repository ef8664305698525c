"""A patch site below the last FFN (patching/eval/deepsite.py): the replayed stack equals a full
forward at the new site for every architecture row, and the editor's gate keeps held-out answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from patching.arch import ArchError, locate
from patching.encode import Encoded
from patching.eval.deepsite import capture_stack, fired, replay_logits, sub_batch
from patching.layer import attach, detach
from patching.trainer import Neurons
from tests.fixtures_models import tiny_model
from tests.test_patching_parity import full_logits, random_neurons, tiny_batch


@pytest.mark.parametrize("activation", ["relu", "relu-cap"])
def test_replayed_layers_equal_a_full_forward_at_the_first_layer(arch_name: str, activation: str) -> None:
    model = tiny_model(arch_name)
    site = locate(model, layer=0)
    assert site.layer_index == 0 and not site.last
    d = site.hidden_size
    wrapper = attach(site, activation)  # type: ignore[arg-type]
    try:
        assert wrapper.dense  # below the last layer every position gets the patch
        wrapper.add(*random_neurons(3, d, seed=1), "earlier")  # accepted neurons already in place
        enc = tiny_batch(model)
        stack, q, _, logits = capture_stack(site, enc.batch)
        assert q.shape[-1] == d
        keys, biases, values = (t.requires_grad_() for t in random_neurons(2, d, seed=2))
        wrapper.candidate = (keys, biases, values)
        replayed = replay_logits(site, stack, enc.rows_b, enc.rows_t)
        want = full_logits(model, enc)
        assert torch.allclose(replayed, want.float(), atol=1e-5, rtol=1e-4)
        # the candidate changes the answer and gradients reach it through the layers above
        before = logits[enc.rows_b, enc.rows_t] if logits.ndim == 3 else logits[enc.rows_b]
        assert not torch.allclose(replayed, before.float())
        replayed.sum().backward()
        assert keys.grad is not None and float(values.grad.abs().sum()) > 0  # type: ignore[union-attr]
    finally:
        wrapper.candidate = None
        detach(site)


def test_a_site_below_the_last_patches_every_position_a_causal_lm_reads_from() -> None:
    """generate() asks for the last position's logits only; a patch at an earlier position of a
    lower layer still reaches them through attention, so the wrapper must not cut positions."""
    model = tiny_model("llama")
    site = locate(model, layer=0)
    wrapper = attach(site, "relu")
    try:
        keys, biases, values = random_neurons(4, site.hidden_size, seed=3)
        wrapper.add(keys, biases + 5.0, values, "e")  # fires everywhere
        ids = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            last = model(input_ids=ids, logits_to_keep=1).logits[:, -1]
            full = model(input_ids=ids).logits[:, -1]
        assert torch.allclose(last, full, atol=1e-6)
    finally:
        detach(site)


def test_a_layer_outside_the_stack_is_refused() -> None:
    model = tiny_model("llama")
    assert locate(model, layer=-2).layer_index == 0
    assert locate(model).last
    with pytest.raises(ArchError, match="outside the stack of 2 layers"):
        locate(model, layer=2)


def test_fired_counts_real_positions_only_and_sub_batch_renumbers_rows() -> None:
    q = torch.zeros(3, 4, 2)
    q[0, 1, 0] = 1.0  # sequence 0 fires at a real position
    q[2, 3, 0] = 1.0  # sequence 2 fires only at a padded one
    mask = torch.ones(3, 4, dtype=torch.long)
    mask[2, 3] = 0
    nr = Neurons(torch.tensor([[1.0, 0.0]]), torch.tensor([-0.5]), torch.ones(1, 2))
    assert fired(q, mask, nr, "relu").tolist() == [True, False, False]
    assert fired(q, None, nr, "relu").tolist() == [True, False, True]
    enc = Encoded(
        {"input_ids": torch.arange(12).reshape(3, 4)},
        torch.tensor([0, 0, 1, 2, 2]),
        torch.tensor([1, 2, 3, 0, 1]),
        torch.tensor([5, 6, 7, 8, 9]),
    )
    sub = sub_batch(enc, torch.tensor([0, 2]))
    assert sub.batch["input_ids"].tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]
    assert sub.rows_b.tolist() == [0, 0, 1, 1]
    assert sub.rows_t.tolist() == [1, 2, 0, 1]
    assert sub.targets.tolist() == [5, 6, 8, 9]


def test_the_editors_gate_counts_what_real_decoding_shows_and_reset_restores_the_base(tmp_path: Path) -> None:
    """The exact gate below the last layer: the held-out answers it counts as changed (re-running
    only the sequences where a new neuron fires) are those that greedy decoding shows changed, edit
    after edit; an accepted edit is answered right; reset gives the base back."""
    from patching.bases.load import load_base
    from patching.bases.tasks import TaskAdapter
    from patching.config import GateConfig, TrainConfig
    from patching.eval.deepsite import DeepSiteEditor
    from tests.fixtures_models import tiny_llama_dir

    adapter = TaskAdapter(load_base(str(tiny_llama_dir(tmp_path))))
    memory = [f"what is thing {i}? and how {i}" for i in range(40)]
    heldout = [f"what is item {i}?" for i in range(12)]
    base = adapter.predict(heldout)
    gate = GateConfig(max_changed=len(heldout))  # this random model's keys fire on its garbage answers
    ed = DeepSiteEditor(adapter, memory, heldout, 0.0, TrainConfig(max_steps=300), gate)
    try:
        assert ed.layer == 0 and ed.memory.shape[0] > 40
        accepted = 0
        for i in range(3):
            before = adapter.predict(heldout)
            out = ed.edit(f"who wrote book {i}?", "zq", str(i))
            after = adapter.predict(heldout)
            if out.status != "accepted":
                assert after == before
                continue
            accepted += 1
            assert adapter.predict([f"who wrote book {i}?"])[0].startswith("zq")
            assert out.gate["changed"] == sum(a != b for a, b in zip(after, before, strict=True))
            assert out.gate["retention_failed"] == 0
        assert accepted >= 1
        # training went through the frozen stack: no weight gradient computed, the flags restored
        assert all(p.grad is None and p.requires_grad for p in adapter.base.model.parameters())
        assert ed.neurons > 0 and ed.memory.shape[0] > ed.memory_base
        ed.reset()
        assert ed.neurons == 0 and ed.memory.shape[0] == ed.memory_base
        assert adapter.predict(heldout) == base
        assert all(torch.equal(c.pred, b.pred) for c, b in zip(ed.heldout, ed.heldout_base, strict=True))
    finally:
        ed.close()


def test_the_bases_answer_ids_are_decoded_once_and_then_read_from_the_disk_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from patching.bases import tasks
    from patching.bases.load import load_base
    from tests.fixtures_models import tiny_llama_dir

    adapter = tasks.TaskAdapter(load_base(str(tiny_llama_dir(tmp_path / "base"))))
    prompts = ["what is item 1?", "what is item 2?"]
    first = adapter.base_answer_ids(prompts)
    assert len(first) == 2 and all(first)

    def no_decoding(*_a: object, **_k: object) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr(tasks, "greedy_ids", no_decoding)
    assert adapter.base_answer_ids(prompts) == first
    with pytest.raises(AssertionError, match="decoded again"):
        adapter.base_answer_ids(prompts[:1])  # another input list: another cache file
