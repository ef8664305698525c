"""The subject key (patching/subject.py): its tensor functions, the layer's running max in a real
forward and in generate() with a KV cache, and sequential subject edits through the engine."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from daemon.settings import SettingsError, load_settings
from patching.arch import locate
from patching.capture import capture
from patching.config import GateConfig, TrainConfig
from patching.encode import NAME_GLUE, NAME_OTHER, NAME_PIECE, Encoded, generation, generation_ids
from patching.engine import Patcher, resolved_config, with_floor_copy
from patching.layer import attach, attach_subject, continues, neuron_output
from patching.subject import (
    Detector,
    SequenceBank,
    Sequences,
    end_of_name,
    fit_detector,
    locate_token,
    running_max,
    whitening_apart,
    whitening_with,
    with_column,
)
from patching.trainer import EditTensors

VOCAB = 200


def llama(layers: int = 4, seed: int = 0) -> T.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return T.LlamaForCausalLM(cfg).eval()


def test_running_max_goes_on_from_its_carry_and_ignores_padding() -> None:
    g = torch.Generator().manual_seed(0)
    d = torch.randn(3, 9, 5, generator=g) * 2
    whole = running_max(d)
    first = running_max(d[:, :4])
    rest = running_max(d[:, 4:], carry=first[:, -1])
    assert torch.equal(torch.cat([first, rest], 1), whole)  # one decoding step at a time = the whole prompt
    assert float(whole.max()) <= 1.0 and float(whole.min()) >= -1.0
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[0, :3] = False  # left padding
    big = d.clone()
    big[0, :3] = 50.0  # padding that would fire if read
    masked = running_max(big, valid)
    assert torch.equal(masked[0, 3:], running_max(d[:1, 3:])[0])


def test_the_detector_puts_every_positive_above_one_and_every_negative_below_minus_one() -> None:
    g = torch.Generator().manual_seed(1)
    neg = torch.randn(500, 16, generator=g)
    pos = torch.randn(12, 16, generator=g) * 0.3 + 3.0 * torch.nn.functional.one_hot(torch.tensor(4), 16)
    fit = fit_detector(pos, neg)
    assert fit is not None
    w, a = fit
    assert float((pos @ w + a).min()) >= 1.0 - 1e-4
    assert float((neg @ w + a).max()) <= -1.0 + 1e-4
    assert fit_detector(neg[:5], neg) is None  # the positives are memory rows: nothing separates them


def memory_bank(g: torch.Generator, sequences: int = 60, length: int = 5, dim: int = 8) -> SequenceBank:
    """Random memory sequences; sequence i holds tokens 10 + (i + j) % 40 (every token in 5 of 60:
    common, above the `common` the tests pass)."""
    bank = SequenceBank(dim, torch.device("cpu"))
    ids = torch.stack([10 + (torch.arange(length) + i) % 40 for i in range(sequences)])
    rows = torch.randn(sequences, length, dim, generator=g)
    bank.add(Sequences(rows, torch.ones(sequences, length, dtype=torch.bool), ids))
    return bank


def test_the_locator_finds_the_row_unlike_the_memory_even_where_a_few_memory_texts_hold_it() -> None:
    g = torch.Generator().manual_seed(2)
    bank = memory_bank(g)
    rows = bank.rows()
    prompt = rows[[7, 8, 9, 10]].clone() + 0.01  # familiar rows ...
    ids = bank._ids.view()[[7, 8, 9, 10], 0].clone()
    prompt[2] = torch.randn(8, generator=g) * 5  # ... and a new entity, token 99
    ids[2] = 99
    assert locate_token(prompt, ids, bank, common=0.05) == 2
    prompt[0] = -rows[0] * 9  # position 0 is never taken (it is far from everything)
    assert locate_token(prompt, ids, bank, common=0.05) == 2
    # two memory texts about the same entity (its token, a row like the prompt's): still found, and
    # those texts are no negatives for its detector
    about = torch.stack([prompt[2] + 0.05 * torch.randn(8, generator=g) for _ in range(2)])
    bank.add(Sequences(about[:, None], torch.ones(2, 1, dtype=torch.bool), torch.tensor([[99], [99]])))
    assert locate_token(prompt, ids, bank, common=0.05) == 2
    assert bank.rows_without(99).shape[0] == rows.shape[0]
    assert bank.holding(99).tolist() == [False] * 60 + [True, True]
    # the old rule (the lowest max cosine to any row) loses it to those two texts
    assert locate_token(prompt, ids, bank, common=0.0) != 2
    # a frequent token (here in 5 of 62 texts, above `common`) is never taken, however new its row
    ids[2] = 12
    assert locate_token(prompt, ids, bank, common=0.05) != 2


def test_a_token_that_every_memory_text_holds_gets_no_detector() -> None:
    g = torch.Generator().manual_seed(6)
    pos = torch.randn(3, 8, generator=g)
    assert fit_detector(pos, torch.zeros(0, 8)) is None  # no negative: nothing to tell it from
    assert fit_detector(pos, torch.randn(40, 8, generator=g) - 5.0) is not None


def test_the_surprise_locator_takes_the_least_expected_rare_token() -> None:
    g = torch.Generator().manual_seed(4)
    bank = memory_bank(g)  # tokens 10..49, each in 5 of the 60 texts
    prompt = torch.randn(5, 8, generator=g)
    ids = torch.tensor([10, 11, 98, 99, 12])
    surprise = torch.tensor([0.0, 9.0, 3.0, 6.0, 1.0])
    # token 11 is the most surprising but common (5 of 60 texts); of the rare 98 and 99, 99 wins
    assert locate_token(prompt, ids, bank, common=0.05, surprise=surprise) == 3
    surprise[0] = 99.0  # position 0 is never taken
    assert locate_token(prompt, ids, bank, common=0.05, surprise=surprise) == 3
    # no rare token at all: the most surprising of every position
    assert locate_token(prompt, torch.tensor([10, 11, 12, 13, 14]), bank, common=0.05, surprise=surprise) == 1


def word_tokenizer() -> T.PreTrainedTokenizerFast:
    """Whole words as GPT-2 writes them ("Ġ" for a leading space), punctuation apart; built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = "In ĠPrince ĠEdward ĠIsland , Ġan Ġofficial Ġlanguage Ġis Which Ġplace Ġdoes ĠDixon Ġof ĠDock"
    words += " ĠGreen Ġexist Ġin ? What Ġday Ġwas ĠUSA - 64 Ġlaunched Ġ2000"
    vocab = {w: i for i, w in enumerate(["<unk>", *words.split()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>")


def test_name_pieces_are_read_from_the_text_and_the_name_locator_walks_to_its_end() -> None:
    tok = word_tokenizer()
    P, G, O = NAME_PIECE, NAME_GLUE, NAME_OTHER
    cases = [
        # text, codes of its tokens, the most surprising token -> where the walk ends
        ("In Prince Edward Island, an official language is", [P, P, P, P, O, O, O, O, O], 1, 3),
        ("Which place does Dixon of Dock Green exist in?", [P, O, O, P, G, P, P, O, O, O], 3, 6),
        ("What day was USA-64 launched", [P, O, O, P, G, P, O], 3, 5),
    ]
    for text, codes, start, end in cases:
        enc = generation(tok, [text, "Other " + text], [""] * 2, names=True)
        assert enc.name_pieces is not None and enc.name_pieces.tolist() == codes  # example 0's prompt only
        assert end_of_name(start, enc.name_pieces) == end
    # glue never ends a name: "Dixon of" then a lower-case word stops at " Dixon"
    assert end_of_name(0, torch.tensor([P, G, O], dtype=torch.int8)) == 0
    assert end_of_name(2, torch.tensor([P, G, O], dtype=torch.int8)) == 2  # a name of one token
    # a batch that does not ask for them (memory batches among them) carries none
    assert generation(tok, ["In Prince Edward Island"], [""], all_rows=True).name_pieces is None
    # the locator: the most surprising rare token, then the end of its name
    g = torch.Generator().manual_seed(4)
    bank = memory_bank(g)  # tokens 10..49, each in 5 of the 60 texts
    ids = torch.tensor([10, 97, 98, 99, 11, 12])
    surprise = torch.tensor([0.0, 9.0, 3.0, 2.0, 1.0, 1.0])
    name = torch.tensor([O, P, P, G, P, O], dtype=torch.int8)
    prompt = torch.randn(6, 8, generator=g)
    assert locate_token(prompt, ids, bank, common=0.05, surprise=surprise) == 1
    assert locate_token(prompt, ids, bank, common=0.05, surprise=surprise, name=name) == 4


def test_whitening_with_a_column_equals_inverting_the_whole_covariance() -> None:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(400, 6, generator=g) @ torch.randn(6, 6, generator=g)
    m = torch.tanh(q[:, 0] + torch.randn(400, generator=g))
    ridge = 0.05
    x = q - q.mean(0)
    prec = torch.linalg.inv(x.T @ x / 399 + ridge * torch.eye(6))
    mu_aug, p_aug = whitening_with((q.mean(0), prec), q, m, ridge)
    full = torch.cat([q, m[:, None]], 1)
    xf = full - full.mean(0)
    direct = torch.linalg.inv(xf.T @ xf / 399 + ridge * torch.eye(7))
    assert torch.allclose(mu_aug, full.mean(0), atol=1e-5)
    assert torch.allclose(p_aug, direct, atol=1e-3, rtol=1e-3)


def test_whitening_apart_gives_the_plain_key_with_no_subject_term() -> None:
    g = torch.Generator().manual_seed(6)
    q = torch.randn(50, 5, generator=g)
    prec = torch.linalg.inv(torch.cov(q.T) + 0.01 * torch.eye(5))
    m = -torch.ones(50)  # every memory row at the floor: whitening_with would weigh m by 1 / ridge
    mu_aug, p_aug = whitening_apart((q.mean(0), prec), m)
    row = torch.cat([torch.randn(5, generator=g), torch.ones(1)])
    key = p_aug @ (row - mu_aug)
    assert torch.allclose(key[:5], prec @ (row[:5] - q.mean(0))) and float(key[5]) == 0.0


def test_the_sequence_bank_gives_the_running_max_of_each_rows_own_prefix() -> None:
    g = torch.Generator().manual_seed(4)
    bank = SequenceBank(5, torch.device("cpu"))
    rows = torch.randn(2, 6, 5, generator=g)
    valid = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    ids = torch.randint(3, VOCAB, (2, 6), generator=g)
    first = bank.add(Sequences(rows, valid, ids))
    w, a = torch.randn(5, generator=g), torch.tensor(0.1)
    seq, t = torch.tensor([first, first, first + 1]), torch.tensor([2, 5, 2])
    want = Sequences(rows, valid, ids).prefix_max(w, a, seq - first, t)
    assert torch.equal(bank.prefix_max(w, a, seq, t), want)
    assert len(bank) == 2 and bank.rows().shape == (9, 5)


def subject_model(seed: int = 0) -> tuple[T.LlamaForCausalLM, int]:
    """A 4-layer llama with 6 subject neurons on the last FFN reading layer 2, strong enough to
    change greedy outputs; returns the model and d."""
    model = llama(seed=seed)
    site = locate(model)
    wrapper = attach(site, "relu-cap")
    attach_subject(site, wrapper, locate(model, layer=2))
    g = torch.Generator().manual_seed(seed + 10)
    d = site.hidden_size
    keys, biases = torch.randn(6, d, generator=g) * 0.3, torch.zeros(6)
    values = torch.randn(6, d, generator=g) * 8
    # three edits' detectors, two neurons each (the layer scores each distinct detector once)
    w, a = torch.randn(3, d, generator=g).repeat_interleave(2, 0), torch.randn(3, generator=g).repeat_interleave(2)
    wrapper.add(keys, biases, values, "e", subject=(w, a, torch.tensor([2.0, 1.0] * 3)))
    return model, d


def test_a_forward_with_subject_neurons_equals_the_cached_rows_with_m_as_a_column() -> None:
    model, d = subject_model()
    site = locate(model)
    wrapper = site.ffn_out
    ids = torch.randint(3, VOCAB, (3, 11), generator=torch.Generator().manual_seed(5))
    g_site = locate(model, layer=2)
    got: list[torch.Tensor] = []
    h = g_site.ffn_in.register_forward_pre_hook(lambda _m, args: got.append(args[0].detach()))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    h.remove()
    # the same logits from the cached tensors: base FFN output, q, and m from layer 2's rows
    with wrapper.without_neurons(), capture(site) as cap, torch.no_grad():
        model(input_ids=ids)
    q, ffn, res = cap.require()
    det = wrapper.det
    assert det is not None and wrapper.detectors()[0].shape[0] == 3
    m = running_max(got[-1] @ det[0].T + det[1])  # [B, T, n]: every neuron's own detector
    pre = q @ wrapper.keys.T + wrapper.biases + det[2] * m
    delta = pre.clamp(0, 1) @ wrapper.values
    assert int((pre > 0).sum()) > 0  # the neurons fire somewhere
    want = site.head(site.final_norm(res + ffn + delta))
    assert torch.allclose(logits, want, atol=1e-4)
    # and the engine's form of it: one neuron over [q, m]
    one = neuron_output(
        torch.cat([q[0], m[0, :, :1]], -1),
        torch.cat([wrapper.keys[:1], det[2][:1, None]], 1),
        wrapper.biases[:1],
        wrapper.values[:1],
        "relu-cap",
    )
    assert torch.allclose(one, pre[0, :, :1].clamp(0, 1) @ wrapper.values[:1], atol=1e-5)


def greedy_without_cache(model: T.LlamaForCausalLM, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    ids = prompt[None]
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
    return ids[0, prompt.numel() :]


def test_generate_with_a_kv_cache_carries_the_running_max_across_steps() -> None:
    model, _ = subject_model(seed=1)
    wrapper = locate(model).ffn_out
    prompts = torch.randint(3, VOCAB, (4, 7), generator=torch.Generator().manual_seed(6))
    for prompt in prompts:
        out = model.generate(
            input_ids=prompt[None], attention_mask=torch.ones(1, 7), max_new_tokens=8, do_sample=False, pad_token_id=0
        )
        got = out[0, 7:]  # generate() stops at <eos> (2)
        assert torch.equal(got, greedy_without_cache(model, prompt, 8)[: got.numel()])
        assert got.numel() == 8 or int(got[-1]) == 2
    # left-padded batch generation gives each prompt's own answer (padding never raises m)
    short = prompts[1, 2:]
    batch = torch.stack([prompts[0], torch.cat([torch.zeros(2, dtype=torch.long), short])])
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = out[1, 7:]
    want = greedy_without_cache(model, short, 6)
    stop = int((want == 2).nonzero()[0]) + 1 if bool((want == 2).any()) else 6
    assert torch.equal(got[:stop], want[:stop])
    # without the subject neurons' gains the answers differ: the carried max is what is tested
    assert wrapper.det is not None and float(wrapper.det[2].abs().sum()) > 0


def gen_batch(prompts: list[torch.Tensor], targets: list[torch.Tensor], all_rows: bool = False) -> Encoded:
    return generation_ids(prompts, targets, seq2seq=False, pad_id=0, all_rows=all_rows)


Stream = tuple[
    T.LlamaForCausalLM, Patcher, list[torch.Tensor], list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]], int
]


def subject_stream(floor: bool, edits: int = 6, locator: str = "memory") -> Stream:
    """A subject-key Patcher on a 4-layer llama with a memory of 120 random prompts and 40
    held-out ones, after `edits` sequential edits (each with two context copies); returns the
    model, the patcher, the memory and held-out prompts, the (prompt, target) of each accepted
    edit and how many got a detector."""
    model = llama(seed=2)
    cfg = TrainConfig(
        subject_key=True, subject_floor=floor, subject_locator=locator, max_steps=300, equivalent_steps=100
    )
    patcher = Patcher(model, train=cfg, gate=GateConfig())
    g = torch.Generator().manual_seed(7)
    memory = [torch.randint(3, VOCAB, (8,), generator=g) for _ in range(120)]
    heldout = [torch.randint(3, VOCAB, (8,), generator=g) for _ in range(40)]
    build(patcher, memory, heldout)
    detectors = 0
    done = []
    for i in range(edits):
        prompt = torch.randint(3, VOCAB, (8,), generator=g)
        with torch.no_grad():
            now = int(model(input_ids=prompt[None]).logits[0, -1].argmax())
        target = torch.tensor([(now + 1 + i) % (VOCAB - 3) + 3])
        # the edit and two context copies: the same prompt behind other tokens (as context_prefixes makes)
        copies = [torch.cat([torch.randint(3, VOCAB, (4,), generator=g), prompt]) for _ in range(2)]
        enc = gen_batch([prompt, *copies], [target] * 3)
        if locator == "name":  # tokens 2..4 one name, as encode.name_pieces reads it from the text
            enc.name_pieces = torch.tensor([0, 0, 0, 1, 2, 1, 0, 0], dtype=torch.int8)
        out = patcher.edit(enc, edit_id=f"e{i}")
        assert out.status == "accepted", out.reasons
        assert out.proposal is not None and out.proposal.subject is not None
        detectors += out.proposal.subject.detector is not None
        done.append((prompt, target))
    return model, patcher, memory, heldout, done, detectors


def build(patcher: Patcher, memory: list[torch.Tensor], heldout: list[torch.Tensor]) -> list[torch.Tensor]:
    """M from the memory prompts and the held-out cache with the model's own answers (returned)."""
    patcher.build_memory(
        [gen_batch(memory[i : i + 40], [torch.zeros(0, dtype=torch.long)] * 40, True) for i in (0, 40, 80)]
    )
    with torch.no_grad():
        answers = [patcher.model(input_ids=p[None]).logits[0, -1].argmax()[None] for p in heldout]
    patcher.build_heldout([gen_batch(heldout, answers)])
    return answers


@pytest.mark.parametrize(
    ("floor", "locator"), [(False, "memory"), (True, "memory"), (True, "surprise"), (True, "name")]
)
def test_sequential_subject_edits_hold_in_the_real_model_and_leave_held_out_answers(floor: bool, locator: str) -> None:
    model, patcher, _memory, heldout, edits, detectors = subject_stream(floor, locator=locator)
    assert patcher.subject is not None and len(patcher.subject.memory) == 120 + len(edits)
    assert detectors >= 3  # most edits found a separable subject token
    assert patcher.wrapper.det is not None
    heldout_cache = patcher.heldout
    assert heldout_cache is not None
    with torch.no_grad():
        for prompt, target in edits:  # retention, in the real model with the running max in place
            assert int(model(input_ids=prompt[None]).logits[0, -1].argmax()) == int(target)
        for p, a in zip(heldout, heldout_cache.pred.tolist(), strict=True):  # locality
            assert int(model(input_ids=p[None]).logits[0, -1].argmax()) == int(a)
    assert len(patcher.memory) == len(patcher.subject.memory_refs.seq)


def test_subject_patches_replay_and_load_as_the_run_left_them(tmp_path) -> None:
    """evaluate --resume and a downstream load: the detectors go through the patch file bit for
    bit, a replay rebuilds the run's layer (and its bank of layer-L_s sequences), and a base with
    the patch set attached answers as the patched model does."""
    from patching import patchfile
    from patching.eval.resume import load_patches, save_patches
    from patching.loading import attach_patches

    model, patcher, memory, heldout, edits, detectors = subject_stream(floor=True, edits=4)
    assert detectors >= 2
    path = tmp_path / "run.patches.safetensors"
    save_patches(path, patcher)
    saved = load_patches(path)
    assert saved.scale == patcher.subject_scale() and set(saved.detectors) <= set(saved.neurons)
    assert len(saved.detectors) == detectors

    again = Patcher(llama(seed=2), train=patcher.train_cfg, gate=GateConfig())
    build(again, memory, heldout)
    for i, (prompt, target) in enumerate(edits):
        edit_id = f"e{i}"
        verdict = again.replay(
            gen_batch([prompt], [target]), edit_id, saved.neurons[edit_id], saved.detectors.get(edit_id), saved.scale
        )
        assert verdict.passed, verdict.reasons
    one, two = patcher.wrapper, again.wrapper
    assert one.det is not None and two.det is not None
    mine, theirs = (one.keys, one.biases, one.values, *one.det), (two.keys, two.biases, two.values, *two.det)
    assert all(torch.equal(x, y) for x, y in zip(mine, theirs, strict=True))
    assert again.subject is not None and len(again.subject.memory) == 120 + len(edits)
    assert torch.allclose(again.memory.view(), patcher.memory.view(), atol=1e-5)
    with pytest.raises(ValueError, match="column scale"):
        again.replay(gen_batch([edits[0][0]], [edits[0][1]]), "x", saved.neurons["e0"], saved.detectors["e0"], 1.0)

    # downstream: the patch set onto a fresh copy of the base
    site = locate(model)
    ids = list(one.edit_ids)
    config = patchfile.PatchConfig("id", "llama", site.layer_index, "relu-cap", site.hidden_size, one.n, ids)
    loaded = attach_patches(llama(seed=2), config, patchfile.read_file(path), "id")
    batch = torch.stack([p for p, _ in edits] + heldout[:8])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch).logits, model(input_ids=batch).logits)
    plain = Patcher(llama(seed=2), train=TrainConfig(subject_key=False), gate=GateConfig())
    with pytest.raises(ValueError, match="need trainer.subject_key"):
        plain.replay(gen_batch([edits[0][0]], [edits[0][1]]), "e0", saved.neurons["e0"], saved.detectors["e0"], 1.0)


def test_a_patch_file_keeps_detectors_bit_for_bit_and_writes_them_only_when_there() -> None:
    from patching import patchfile

    g = torch.Generator().manual_seed(3)
    keys, biases, values = torch.randn(3, 4, generator=g), torch.randn(3, generator=g), torch.randn(3, 4, generator=g)
    plain = patchfile.encode(keys, biases, values, ["1", "2", "2"])
    assert patchfile.decode(plain).subject is None and b"subject" not in plain
    w = torch.cat([torch.zeros(1, 5), torch.randn(2, 5, generator=g)])  # edit 1: an ordinary neuron
    sub = patchfile.SubjectTensors(w, torch.randn(3, generator=g), torch.randn(3, generator=g), 2, 1.5)
    back = patchfile.decode(patchfile.encode(keys, biases, values, ["1", "2", "2"], subject=sub))
    assert back.subject is not None and (back.subject.layer, back.subject.scale) == (2, 1.5)
    for x, y in zip((sub.w, sub.a, sub.c), (back.subject.w, back.subject.a, back.subject.c), strict=True):
        assert torch.equal(x, y)
    assert back.subject_of_edit("1") is None and back.metadata == {}
    got = back.subject_of_edit("2")
    assert got is not None and torch.equal(got[2], sub.c[1:])
    # joined with a part of ordinary neurons: zeros there
    joined = patchfile.concat([patchfile.decode(plain), back], 4)
    assert joined.subject is not None and joined.subject.w.shape == (6, 5)
    assert float(joined.subject.w[:3].abs().sum()) == 0
    short = patchfile.SubjectTensors(w[:2], sub.a, sub.c, 2, 1.0)
    with pytest.raises(patchfile.PatchStateError, match="subject_w"):
        patchfile.encode(keys, biases, values, ["1", "2", "2"], subject=short)


def test_the_floor_copy_is_the_edit_with_m_at_its_floor_as_one_more_example() -> None:
    g = torch.Generator().manual_seed(5)
    det = Detector(torch.randn(4, generator=g), torch.tensor(0.0), scale=3.0)

    def rows(groups: list[int]) -> EditTensors:  # two rows per example, m = +1 (the subject is there)
        n = 2 * len(groups)
        q = with_column(torch.randn(n, 6, generator=g), det.column(torch.ones(n)))
        group = torch.tensor(groups).repeat_interleave(2)
        return EditTensors(q, torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g), torch.arange(n), group)

    edit = rows([0])
    alone = with_floor_copy(edit, None, det)
    assert torch.equal(alone.q[:, :-1], edit.q[:, :-1]) and alone.q[:, -1].tolist() == [-3.0, -3.0]
    assert alone.group is not None and alone.group.tolist() == [1, 1] and torch.equal(alone.targets, edit.targets)
    copies = rows([1, 2])  # two context copies
    both = with_floor_copy(edit, copies, det)
    assert both.rows == 6 and both.group is not None and both.group.tolist() == [1, 1, 2, 2, 3, 3]
    assert torch.equal(both.q[:4], copies.q) and both.q[4:, -1].tolist() == [-3.0, -3.0]


def test_the_default_subject_key_is_on_only_for_a_decoder_with_a_layer_below_the_patched_one() -> None:
    from tests.fixtures_models import tiny_model

    def subject(model: torch.nn.Module, **train: object) -> bool:
        return Patcher(model, train=TrainConfig(**train), gate=GateConfig()).subject is not None  # type: ignore[arg-type]

    assert TrainConfig().subject_key is None
    # what reports record: the default resolved for the model
    assert resolved_config(llama(layers=4), TrainConfig()).subject_key is True
    assert resolved_config(llama(layers=2), TrainConfig()).subject_key is False
    assert resolved_config(tiny_model("bert"), TrainConfig()).subject_key is False
    assert subject(llama(layers=4))  # half depth: layer 2, below the last (3)
    assert not subject(llama(layers=2))  # half depth is the patched layer 1: nothing below to read
    assert subject(llama(layers=2), subject_layer=0.25)
    assert not subject(llama(layers=4), subject_key=False)
    assert not subject(llama(layers=4), mode="reference")  # the subject key trains cached only
    assert not subject(tiny_model("bert"))  # a classifier keeps the plain key
    with pytest.raises(ValueError, match="causal LM"):
        subject(tiny_model("bert"), subject_key=True)


def test_the_daemon_takes_the_subject_key_and_names_a_bad_locator(tmp_path) -> None:
    cfg = tmp_path / "patchd.toml"
    cfg.write_text('[model]\nname = "m"\n[trainer]\nsubject_key = true\n')
    assert load_settings(cfg, env={}).trainer.subject_key
    with pytest.raises(SettingsError, match="trainer.subject_locator"):
        load_settings(cfg, env={"PATCHD_TRAINER_SUBJECT_LOCATOR": "first"})


def test_only_a_call_that_goes_on_with_a_filled_cache_continues_the_running_max() -> None:
    cache = T.DynamicCache()
    assert not continues({}) and not continues({"cache": cache}) and not continues({"past_key_values": cache})
    model = llama()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    filled = out.past_key_values
    assert continues({"cache": filled}) and continues({"past_key_values": filled})
    assert continues({"cache_position": torch.tensor([3])}) and not continues({"cache_position": torch.arange(3)})


def test_a_new_prompt_starts_its_running_max_afresh() -> None:
    model, _ = subject_model(seed=3)
    wrapper = locate(model).ffn_out
    b = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        fresh = model(input_ids=b).logits
        model.generate(
            input_ids=b + 1, attention_mask=torch.ones_like(b), max_new_tokens=3, do_sample=False, pad_token_id=0
        )
        # a carry from the other prompt's last step, as high as it gets: it must not leak in
        wrapper._carry = torch.ones(1, wrapper.n)
        again = model(input_ids=b).logits
    assert torch.equal(fresh, again)


def test_a_subject_snapshot_restores_the_uninterrupted_run_bit_for_bit(tmp_path) -> None:
    """The engine snapshot (format 2) carries the edits' layer-L_s sequences, their refs and the
    detectors: a restart from it goes on exactly as the run that never stopped."""
    from patching import snapshot

    def fresh() -> Patcher:
        model = llama(seed=2)
        cfg = TrainConfig(subject_key=True, subject_floor=True, max_steps=300, equivalent_steps=100)
        patcher = Patcher(model, train=cfg, gate=GateConfig())
        g = torch.Generator().manual_seed(7)
        memory = [torch.randint(3, VOCAB, (8,), generator=g) for _ in range(120)]
        heldout = [torch.randint(3, VOCAB, (8,), generator=g) for _ in range(40)]
        build(patcher, memory, heldout)
        return patcher

    g = torch.Generator().manual_seed(11)
    base = llama(seed=2)
    encs = []
    for i in range(7):
        prompt = torch.randint(3, VOCAB, (8,), generator=g)
        with torch.no_grad():
            now = int(base(input_ids=prompt[None]).logits[0, -1].argmax())
        target = torch.tensor([(now + 1 + i) % (VOCAB - 3) + 3])
        copies = [torch.cat([torch.randint(3, VOCAB, (4,), generator=g), prompt]) for _ in range(2)]
        encs.append(gen_batch([prompt, *copies], [target] * 3))

    def run(p: Patcher, span: range) -> None:
        for i in span:
            out = p.edit(encs[i], edit_id=f"e{i}")
            assert out.status == "accepted", out.reasons

    whole = fresh()
    run(whole, range(6))
    nxt = whole.propose(encs[6], "e6")
    first = fresh()
    run(first, range(3))
    path = tmp_path / "engine.safetensors"
    snapshot.save(path, first.export_state(), {"model": "tiny"})
    restarted = fresh()
    state, meta = snapshot.load(path, {"model": "tiny"})
    assert meta["format"] == "2" and state.subject is not None
    restarted.restore_state(state)
    run(restarted, range(3, 6))

    a, b = whole, restarted
    assert a.subject is not None and b.subject is not None and a.wrapper.det is not None and b.wrapper.det is not None
    pairs = [
        (a.wrapper.keys, b.wrapper.keys),
        (a.wrapper.values, b.wrapper.values),
        *zip(a.wrapper.det, b.wrapper.det, strict=True),
        (a.memory.view(), b.memory.view()),
        (a.subject.memory.rows(), b.subject.memory.rows()),
        (a.subject.memory_refs.seq, b.subject.memory_refs.seq),
        (a.subject.retention_refs.t, b.subject.retention_refs.t),
    ]
    assert all(torch.equal(x, y) for x, y in pairs)
    assert a.subject.memory.lengths == b.subject.memory.lengths
    again = restarted.propose(encs[6], "e6")
    assert nxt is not None and again is not None and nxt.gate.to_dict() == again.gate.to_dict()
    assert torch.equal(nxt.neurons.keys, again.neurons.keys)
    # a plain Patcher refuses it (and a subject one a plain state), changing nothing
    plain = Patcher(llama(seed=2), train=TrainConfig(subject_key=False), gate=GateConfig())
    with pytest.raises(ValueError, match="subject_key"):
        plain.restore_state(state)
    assert plain.wrapper.n == 0


def test_rollback_undoes_subject_edits_and_the_same_edit_then_trains_the_same() -> None:
    """Patcher.checkpoint/rollback (the benchmarks' way back) with trainer.subject_key: the layer-L_s
    bank, the refs and the detectors go back with the neurons."""
    model, patcher, _memory, _heldout, _edits, _ = subject_stream(floor=True, edits=2)
    sub = patcher.subject
    assert sub is not None

    def state() -> list[torch.Tensor]:
        w = patcher.wrapper
        assert w.det is not None
        held = (w.keys, w.values, *w.det, sub.memory.rows(), sub.memory_refs.seq, sub.retention_refs.t)
        return [t.clone() for t in held]

    g = torch.Generator().manual_seed(11)
    prompt = torch.randint(3, VOCAB, (8,), generator=g)
    with torch.no_grad():
        target = torch.tensor([(int(model(input_ids=prompt[None]).logits[0, -1].argmax()) + 5) % (VOCAB - 3) + 3])
    copies = [torch.cat([torch.randint(3, VOCAB, (4,), generator=g), prompt]) for _ in range(2)]
    enc = gen_batch([prompt, *copies], [target] * 3)
    before, cp = state(), patcher.checkpoint()
    first = patcher.edit(enc, edit_id="x")
    assert first.status == "accepted" and len(sub.memory) == 120 + 3
    patcher.rollback(cp)
    assert len(sub.memory) == 120 + 2
    for a, b in zip(state(), before, strict=True):
        assert torch.equal(a, b)
    again = patcher.edit(enc, edit_id="x")
    assert again.proposal is not None and first.proposal is not None
    assert torch.equal(again.proposal.neurons.keys, first.proposal.neurons.keys)
