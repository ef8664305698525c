"""Sequential edits on a tiny model: all succeed, earlier edits stay right, held-out unchanged."""

from __future__ import annotations

from dataclasses import replace

import torch
import transformers as T

from patching.config import GateConfig, TrainConfig
from patching.encode import Encoded
from patching.engine import Patcher

VOCAB = 1000


def tiny_classifier() -> T.BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = T.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=2,
        max_position_embeddings=32,
    )
    return T.BertForSequenceClassification(cfg).eval()


def batch(ids: torch.Tensor, labels: torch.Tensor | None = None) -> Encoded:
    B = ids.shape[0]
    return Encoded(
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        torch.arange(B),
        torch.zeros(B, dtype=torch.long),
        labels if labels is not None else torch.full((B,), -1),
    )


def predict(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.argmax(-1)


def inputs(seed: int = 0) -> torch.Tensor:
    """[540, 8] token ids: memory [:300], held-out [300:500], edits [500:520]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (540, 8), generator=g)
    # a random tiny BERT's position-0 state mostly reflects its own token: make that token unique
    # per input, as the varied contexts of a trained model would make the states distinct
    ids[:, 0] = torch.randperm(VOCAB - 5, generator=g)[:540] + 5
    return ids


def setup(seed: int = 0, train: TrainConfig | None = None) -> tuple[Patcher, torch.Tensor, torch.Tensor]:
    ids = inputs(seed)
    memory, heldout, edits = ids[:300], ids[300:500], ids[500:520]
    model = tiny_classifier()
    patcher = Patcher(model, train=train or TrainConfig(max_steps=300, equivalent_steps=100), gate=GateConfig())
    patcher.build_memory([batch(memory[i : i + 100]) for i in range(0, 300, 100)])
    patcher.build_heldout([batch(heldout)])
    return patcher, heldout, edits


def test_twenty_sequential_edits_succeed_and_keep_everything_else() -> None:
    patcher, heldout, edits = setup()
    model = patcher.model
    held_before = predict(model, heldout)
    targets = 1 - predict(model, edits)  # every edit is a real mistake: flip the current prediction
    for i in range(20):
        outcome = patcher.edit(batch(edits[i : i + 1], targets[i : i + 1]), edit_id=f"e{i}")
        assert outcome.status == "accepted", outcome.reasons
        # the full model (not just the cache) now gets this edit right
        assert predict(model, edits[i : i + 1]).item() == targets[i].item()
    assert torch.equal(predict(model, edits), targets)  # retention: every earlier edit still right
    assert torch.equal(predict(model, heldout), held_before)  # locality: nothing held-out changed
    assert patcher.wrapper.n == 20 and patcher.edit_ids == [f"e{i}" for i in range(20)]


def test_impossible_edit_is_rejected_and_leaves_the_model_unchanged() -> None:
    patcher, heldout, _ = setup()
    model = patcher.model
    # the edit's input is also in the memory: no ReLU neuron can fire on it and stay silent on M
    victim = heldout[:1].clone()
    patcher.build_memory([batch(victim)])
    before = predict(model, heldout)
    target = 1 - predict(model, victim)
    outcome = patcher.edit(batch(victim, target), edit_id="impossible")
    assert outcome.status == "rejected"
    assert outcome.reasons
    assert patcher.wrapper.n == 0 and patcher.edit_ids == []
    assert torch.equal(predict(model, heldout), before)


def test_replay_rebuilds_the_same_model() -> None:
    patcher, heldout, edits = setup()
    targets = 1 - predict(patcher.model, edits)
    kept = []
    for i in range(5):
        out = patcher.edit(batch(edits[i : i + 1], targets[i : i + 1]), edit_id=f"e{i}")
        assert out.status == "accepted" and out.proposal is not None
        kept.append((i, out.proposal.neurons))
    after = predict(patcher.model, heldout), predict(patcher.model, edits)
    fresh, _, _ = setup()  # a restarted process: same base, same memory and held-out inputs
    for i, nr in kept:
        verdict = fresh.replay(batch(edits[i : i + 1], targets[i : i + 1]), f"e{i}", nr)
        assert verdict.passed, verdict.reasons
    assert torch.equal(fresh.wrapper.keys, patcher.wrapper.keys)
    assert fresh.edit_ids == patcher.edit_ids
    assert torch.equal(predict(fresh.model, heldout), after[0]) and torch.equal(predict(fresh.model, edits), after[1])
    assert len(fresh.memory) == len(patcher.memory)


def test_train_equivalents_are_fitted_but_only_the_edit_is_kept_as_an_edit() -> None:
    patcher, heldout, edits = setup()
    model = patcher.model
    held_before = predict(model, heldout)
    target = 1 - predict(model, edits[:1])
    # two inputs with the same wrong prediction stand in for paraphrases of the edit
    wrong = (predict(model, edits[1:]) != target).nonzero().flatten()[:2] + 1
    together = torch.cat([edits[:1], edits[wrong]])
    assert (predict(model, edits[wrong]) != target).all()
    outcome = patcher.edit(batch(together, target.repeat(3)), edit_id="e0")
    assert outcome.status == "accepted", outcome.reasons
    assert (predict(model, together) == target).all()  # the edit and both equivalents are now right
    assert torch.equal(predict(model, heldout), held_before)
    # gated, retained and added to M as ONE edit of one row; one neuron
    assert outcome.proposal is not None and outcome.proposal.edit.rows == 1
    assert patcher.retention is not None and patcher.retention.rows == 1
    assert patcher.wrapper.n == 1 and len(patcher.memory) == 301


def test_an_equivalent_that_cannot_be_fitted_costs_bounded_steps_and_never_blocks_the_edit() -> None:
    patcher, heldout, edits = setup()
    model = patcher.model
    memory_input = inputs()[:1]  # in M
    target = 1 - predict(model, edits[:1])
    kept = predict(model, memory_input)
    # the "paraphrase" is a memory input: a neuron may never fire on it, so it cannot be fitted
    assert (kept != target).all()
    outcome = patcher.edit(batch(torch.cat([edits[:1], memory_input]), target.repeat(2)), edit_id="e0")
    assert outcome.status == "accepted", outcome.reasons
    assert outcome.proposal is not None
    assert outcome.proposal.train.steps <= patcher.train_cfg.equivalent_steps + 50  # not max_steps
    assert predict(model, edits[:1]).item() == target.item()
    assert torch.equal(predict(model, memory_input), kept)


def test_an_unfittable_equivalent_is_dropped_alone_and_the_others_stay_fitted() -> None:
    """Equivalents: one a memory input (ten times in M, so it stays wrong), one an ordinary input.
    At the budget only the wrong one is dropped; the other keeps training and ends right."""
    patcher, heldout, edits = setup()
    model = patcher.model
    memory_input = inputs()[:1]
    patcher.build_memory([batch(memory_input.repeat(10, 1))])
    target = 1 - predict(model, edits[:1])
    other = (predict(model, edits[1:]) != target).nonzero().flatten()[:1] + 1
    kept = predict(model, memory_input)
    assert (kept != target).all() and (predict(model, edits[other]) != target).all()
    together = torch.cat([edits[:1], memory_input, edits[other]])
    outcome = patcher.edit(batch(together, target.repeat(3)), edit_id="e0")
    assert outcome.status == "accepted", outcome.reasons
    assert outcome.proposal is not None and outcome.proposal.train.steps >= patcher.train_cfg.equivalent_steps
    assert outcome.proposal.train.equivalents == 1  # the memory input went, the other stayed
    assert predict(model, edits[:1]).item() == target.item()
    assert predict(model, edits[other]).item() == target.item()  # trained on to the end
    assert torch.equal(predict(model, memory_input), kept)


def test_an_equivalent_whose_fit_moves_a_heldout_prediction_never_blocks_the_edit() -> None:
    """The "paraphrase" is a held-out input whose prediction differs from the target: a neuron that
    fits it changes a held-out prediction, so every attempt with it fails the gate. The retries then
    run again on the edit alone, which passes, and the held-out input keeps its prediction."""
    patcher, heldout, edits = setup()
    model = patcher.model
    held_before = predict(model, heldout)
    target = 1 - predict(model, edits[:1])
    victim = (held_before != target).nonzero().flatten()[:1]
    # one attempt per sequence: with the equivalent (rejected), then the edit alone
    patcher.gate_cfg = replace(patcher.gate_cfg, retries=0)
    outcome = patcher.edit(batch(torch.cat([edits[:1], heldout[victim]]), target.repeat(2)), edit_id="e0")
    assert outcome.status == "accepted", outcome.reasons
    assert outcome.proposal is not None
    assert outcome.proposal.attempts == 2  # the attempt with the equivalent was rejected
    *refused, last = outcome.proposal.tries  # and the proposal says why, try by try (one per cap tried)
    assert refused and all(t["equivalents"] == 1 and t["reasons"] for t in refused)
    assert any(r.startswith("locality") for t in refused for r in t["reasons"])
    assert last["equivalents"] == 0 and last["reasons"] == []
    assert predict(model, edits[:1]).item() == target.item()
    assert torch.equal(predict(model, heldout), held_before)


def test_the_stall_rule_never_cuts_short_an_edit_whose_wrong_rows_all_have_neurons() -> None:
    """Slow progress on an anchored row is still progress (the loss moves before the argmax does):
    only rows without a neuron can stall an attempt. Here the one row is anchored."""
    patcher, heldout, _ = setup()
    victim = heldout[:1].clone()
    patcher.build_memory([batch(victim)])  # in M: no neuron may fire on it, the edit stays wrong
    patcher.train_cfg = replace(patcher.train_cfg, stall_steps=40)
    outcome = patcher.edit(batch(victim, 1 - predict(patcher.model, victim)), edit_id="anchored")
    assert outcome.status == "rejected" and outcome.proposal is not None
    assert outcome.proposal.train.steps == patcher.train_cfg.max_steps


def test_a_long_answer_past_the_neuron_cap_stalls_into_the_retry_that_grows_the_set() -> None:
    """Generation: 3 wrong answer tokens, 1 neuron per attempt. Attempts 0 and 1 cannot make the
    edit right (an unanchored token keeps its context); the stall rule ends them early and attempt 2,
    with 3 neurons, fixes the edit."""
    from patching.encode import generation_ids
    from tests.fixtures_models import VOCAB as V
    from tests.fixtures_models import tiny_model

    model = tiny_model("llama")
    g = torch.Generator().manual_seed(3)

    def enc(prompts: list[torch.Tensor], targets: list[torch.Tensor]) -> Encoded:
        return generation_ids(prompts, targets, seq2seq=False, pad_id=0)

    memory = [torch.randint(3, V, (6,), generator=g) for _ in range(60)]
    patcher = Patcher(
        model, train=TrainConfig(max_steps=400, max_neurons=1, stall_steps=50), gate=GateConfig(retries=2)
    )
    patcher.build_memory([enc(memory, [torch.empty(0, dtype=torch.long)] * len(memory))])
    prompt, answer = torch.randint(3, V, (5,), generator=g), torch.randint(3, V, (3,), generator=g)
    edit = enc([prompt], [answer])
    cached = patcher.cache(edit)
    assert int((patcher.tail(cached.ffn, cached.residual).argmax(-1) != cached.targets).sum()) == 3
    steps: list[int] = []
    train = patcher._train

    def counted(*args, **kwargs):
        result = train(*args, **kwargs)
        steps.append(result.steps)
        return result

    patcher._train = counted  # type: ignore[method-assign]
    outcome = patcher.edit(edit, edit_id="long")
    assert outcome.status == "accepted", outcome.reasons
    assert len(steps) == 3 and outcome.proposal is not None and outcome.proposal.neurons.n == 3
    assert max(steps[:2]) <= 50 + 50  # stalled, not max_steps (the 1 anchored token may flip first)


def test_edits_accepted_in_bfloat16_hold_after_a_save_a_load_and_a_fresh_forward(tmp_path) -> None:
    """The frozen model in bfloat16, the neurons in float32: what the gate accepted on cached tensors
    is what a fresh bfloat16 model with the saved patch set computes."""
    from patching.arch import locate
    from patching.layer import patched
    from patching.loading import attach_patches, base_identity, load_base_model, read_patches, save_patches
    from patching.patchfile import PatchConfig

    ids = inputs(0)
    memory, heldout, edits = ids[:300], ids[300:500], ids[500:510]
    model = tiny_classifier().to(torch.bfloat16)
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)  # the base as a service loads it, before any patch
    patcher = Patcher(model, train=TrainConfig(max_steps=300), gate=GateConfig())
    patcher.build_memory([batch(memory[i : i + 100]) for i in range(0, 300, 100)])
    patcher.build_heldout([batch(heldout)])
    held_before = predict(model, heldout)
    targets = 1 - predict(model, edits)
    accepted = []
    for i in range(len(edits)):
        outcome = patcher.edit(batch(edits[i : i + 1], targets[i : i + 1]), edit_id=f"e{i}")
        if outcome.status == "accepted":
            accepted.append(i)
    assert len(accepted) >= 8, f"only {len(accepted)} of 10 bfloat16 edits accepted"
    assert patcher.wrapper.keys.dtype == torch.float32

    site, wrapper = patcher.site, patcher.wrapper
    config = PatchConfig(
        base_identity(base_dir), "bert", site.layer_index, "relu-cap", site.hidden_size, wrapper.n, wrapper.edit_ids
    )
    save_patches(wrapper, tmp_path / "patches", config)
    saved_config, saved = read_patches(tmp_path / "patches")
    assert saved.keys.dtype == torch.float32  # the patch file keeps float32 neurons
    fresh = attach_patches(
        load_base_model(base_dir, dtype=torch.bfloat16), saved_config, saved, base_identity(base_dir)
    )
    fresh_wrapper = patched(locate(fresh))
    assert fresh_wrapper is not None and torch.equal(fresh_wrapper.keys, wrapper.keys)
    kept = torch.tensor(accepted)
    assert torch.equal(predict(fresh, edits[kept]), targets[kept])  # every accepted edit, in a fresh forward
    assert torch.equal(predict(fresh, heldout), held_before)  # locality held in bfloat16 too


def test_logit_margin_is_the_targets_lead_over_the_runner_up() -> None:
    from patching.trainer import logit_margin

    logits = torch.tensor([[3.0, 1.0, 0.5], [3.0, 1.0, 0.5], [2.0, 2.0, -1.0]])
    targets = torch.tensor([0, 2, 1])
    assert torch.equal(logit_margin(logits, targets), torch.tensor([2.0, -2.5, 0.0]))


def test_a_stop_margin_trains_the_edit_and_its_equivalents_past_it() -> None:
    """With stop_logit_margin the edit ends right with that headroom over the runner-up, on its
    own row and on its train equivalents' rows; the plain rule stops as soon as the argmax is right.
    (This tiny random classifier's logits differ by a few tenths at most.)"""
    leads = []
    for margin in (0.0, 0.15):
        patcher, heldout, edits = setup(train=TrainConfig(max_steps=300, stop_logit_margin=margin))
        model = patcher.model
        held_before = predict(model, heldout)
        target = 1 - predict(model, edits[:1])
        wrong = (predict(model, edits[1:]) != target).nonzero().flatten()[:2] + 1
        together = torch.cat([edits[:1], edits[wrong]])
        outcome = patcher.edit(batch(together, target.repeat(3)), edit_id="e0")
        assert outcome.status == "accepted", outcome.reasons
        assert outcome.proposal is not None and outcome.proposal.train.success
        assert outcome.proposal.train.equivalents == 2  # both equivalents trained to the end
        with torch.no_grad():
            logits = model(input_ids=together, attention_mask=torch.ones_like(together)).logits  # [3, 2]
        lead = (logits[:, target.item()] - logits[:, 1 - target.item()]).min().item()
        assert lead > margin, (margin, lead)
        assert torch.equal(predict(model, heldout), held_before)
        leads.append(lead)
    assert leads[1] > leads[0] + 0.05  # the margin bought headroom the plain rule did not
