"""The patched layer computes only what is read: the patch at the positions whose outputs reach
the logits, the value product over the neurons that fire. Its outputs equal the dense layer's
(every position, every neuron) bit for bit, on random and on real inputs and patches."""

from __future__ import annotations

import pytest
import torch

from patching import layer
from patching.arch import locate
from patching.config import TrainConfig
from patching.engine import Patcher
from tests.fixtures_models import tiny_model
from tests.test_patching_behaviour import batch, predict, setup
from tests.test_patching_parity import random_neurons, tiny_batch


def dense_and_cut(
    model: torch.nn.Module, wrapper: layer.PatchedFFN, monkeypatch: pytest.MonkeyPatch, sparse: bool = True, **kw
):
    """Logits of the dense layer (every position, the full value product), then of the layer as it
    runs (the position cut, and the value product over firing neurons unless `sparse` is False)."""
    with torch.no_grad(), monkeypatch.context() as m:
        m.setattr(layer, "_SPARSE_SHARE", -1.0)  # never sparse
        wrapper.dense = True
        dense = model(**kw).logits
        wrapper.dense = False
        if not sparse:
            return dense, model(**kw).logits
    with torch.no_grad():
        return dense, model(**kw).logits


@pytest.mark.parametrize("packed", [False, True], ids=["matmul", "packed"])
@pytest.mark.parametrize("activation", ["relu", "relu-cap", "gelu"])
def test_random_neurons_on_random_inputs_give_the_dense_layers_logits(
    arch_name: str, activation: str, packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # packed: the keys in oneDNN's layout in blocks of 64 and 16 neurons (2,048 and 256 by default)
    assert layer._ONEDNN, "this torch build has no oneDNN: the packed key product is never used"
    monkeypatch.setattr(layer, "PACK_BLOCK", 64 if packed else 10**9)
    monkeypatch.setattr(layer, "PACK_SMALL", 16 if packed else 10**9)
    model = tiny_model(arch_name)
    patcher = Patcher(model, train=TrainConfig(activation=activation))
    d = patcher.site.hidden_size
    for i, n in enumerate((1, 5, 200)):
        k, b, v = random_neurons(n, d, seed=i)
        patcher.wrapper.add(k, b - 2.0, v, edit_id=f"e{i}")  # mostly silent, as patches are
    enc = tiny_batch(model)
    for batch_ in (enc.batch, {k: v[:1] for k, v in enc.batch.items()}):  # batch 1: fewer rows than _MIN_ROWS
        # the position cut alone is exact to the bit: the same pre-activations, the same sums
        dense, cut = dense_and_cut(model, patcher.wrapper, monkeypatch, sparse=False, **batch_)
        assert torch.equal(dense, cut)
        # the value product over firing neurons adds the same terms; when several neurons are
        # partly active at one position, BLAS may add them in another order (last-bit differences)
        _, sparse = dense_and_cut(model, patcher.wrapper, monkeypatch, **batch_)
        assert torch.allclose(sparse, dense, rtol=1e-5, atol=1e-6) and torch.equal(sparse.argmax(-1), dense.argmax(-1))
    # a causal LM asked for the last position only (as generate() asks in prefill) patches only there
    if not model.config.is_encoder_decoder and patcher.generation:
        dense, cut = dense_and_cut(model, patcher.wrapper, monkeypatch, sparse=False, **enc.batch, logits_to_keep=1)
        assert cut.shape[1] == 1 and torch.equal(dense, cut)
    # hidden states requested: every position is patched, as a caller reading them expects
    dense, _ = dense_and_cut(model, patcher.wrapper, monkeypatch, sparse=False, **enc.batch)
    with torch.no_grad(), monkeypatch.context() as m:
        m.setattr(layer, "_SPARSE_SHARE", -1.0)
        states = model(**enc.batch, output_hidden_states=True)
    assert torch.equal(states.logits, dense)


@pytest.mark.parametrize("packed", [False, True], ids=["matmul", "packed"])
def test_real_patches_on_real_and_random_inputs_give_the_dense_layers_outputs_bit_for_bit(
    packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layer, "PACK_BLOCK", 4 if packed else 10**9)  # 12 edits, 1+ neuron each
    monkeypatch.setattr(layer, "PACK_SMALL", 2 if packed else 10**9)
    patcher, heldout, edits = setup()
    model = patcher.model
    targets = 1 - predict(model, edits)
    for i in range(12):
        out = patcher.edit(batch(edits[i : i + 1], targets[i : i + 1]), edit_id=f"e{i}")
        assert out.status == "accepted", out.reasons
    g = torch.Generator().manual_seed(7)
    random_ids = [torch.randint(5, 1000, (b, t), generator=g) for b, t in ((1, 5), (16, 8), (3, 20))]
    for ids in (edits, edits[:1], heldout, *random_ids):
        dense, cut = dense_and_cut(
            model, patcher.wrapper, monkeypatch, input_ids=ids, attention_mask=torch.ones_like(ids)
        )
        assert torch.equal(dense, cut)
    assert torch.equal(cut.argmax(-1), predict(model, random_ids[-1]))


def test_only_the_read_positions_are_computed_and_the_value_product_only_for_firing_neurons(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny_model("bert")
    patcher = Patcher(model, train=TrainConfig(activation="relu-cap"))
    d = patcher.site.hidden_size
    k, b, v = random_neurons(300, d, seed=3)
    patcher.wrapper.add(k, b - 3.0, v, edit_id="e")
    seen: list[tuple[int, int]] = []
    real = layer.sparse_neuron_output

    def spy(q, keys, biases, values, activation, packed=None, extra=None):
        out = real(q, keys, biases, values, activation, packed, extra)
        seen.append((q.shape[0], int(layer.activate(q @ keys.T + biases, activation).any(0).sum())))
        return out

    monkeypatch.setattr(layer, "sparse_neuron_output", spy)
    enc = tiny_batch(model)
    with torch.no_grad():
        model(**enc.batch)
    rows, firing = seen[-1]
    assert rows == enc.batch["input_ids"].shape[0]  # one row per input: position 0, not B*T
    assert 0 < firing < 300 * layer._SPARSE_SHARE
    assert locate(model).ffn_out is patcher.wrapper and patcher.wrapper.read is None  # consumed


def test_neurons_appended_into_spare_rows_equal_a_plain_concatenation() -> None:
    """add() writes into buffers with spare rows (no copy of every neuron per edit); removes, a
    restore and a move in between must leave exactly what concatenating every add would give."""
    patcher = Patcher(tiny_model("bert"), train=TrainConfig(activation="relu-cap"))
    w, d = patcher.wrapper, patcher.site.hidden_size
    g = torch.Generator().manual_seed(0)
    kept: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for i in range(150):
        m = 1 + i % 3
        k, b, v = torch.randn(m, d, generator=g), torch.randn(m, generator=g), torch.randn(m, d, generator=g)
        w.add(k, b, v, f"e{i}")
        kept.append((f"e{i}", k, b, v))
        if i == 40:
            w.remove(["e3", "e7"])
            kept = [x for x in kept if x[0] not in ("e3", "e7")]
        if i == 80:  # a restart from a snapshot puts a whole set back
            keys, biases, values, ids = w.keys.clone(), w.biases.clone(), w.values.clone(), list(w.edit_ids)
            w.clear()
            w.restore(keys, biases, values, ids)
        if i == 100:
            w.to(torch.float64).to(torch.float32)  # buffers replaced under the layer's feet
    assert torch.equal(w.keys, torch.cat([x[1] for x in kept])) and torch.equal(
        w.values, torch.cat([x[3] for x in kept])
    )
    assert torch.equal(w.biases, torch.cat([x[2] for x in kept]))
    assert w.edit_ids == [x[0] for x in kept for _ in range(x[1].shape[0])]
    assert w.state_dict()["keys"].shape == (w.n, d)  # only the neurons are saved, never the spare rows


def test_the_packed_keys_follow_every_change_of_the_neuron_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of keys are packed once: an add packs only a block it fills, while a remove, a
    restore elsewhere and a write into the keys (load_state_dict) pack anew, so a forward never
    uses stale keys."""
    monkeypatch.setattr(layer, "PACK_BLOCK", 64)
    monkeypatch.setattr(layer, "PACK_SMALL", 16)
    model = tiny_model("bert")
    patcher = Patcher(model, train=TrainConfig(activation="relu"))
    w, d = patcher.wrapper, patcher.site.hidden_size
    enc = tiny_batch(model)

    def logits(pack: bool) -> torch.Tensor:
        with torch.no_grad():
            if not pack:  # the plain product, for reference
                with monkeypatch.context() as m:
                    m.setattr(w, "_packed", lambda dtype: None)
                    return model(**enc.batch).logits
            return model(**enc.batch).logits

    def packed() -> dict[tuple[int, int], torch.Tensor]:
        assert w._pack is not None
        return {(a, b): t for a, b, t in w._pack.blocks}

    k, b, v = random_neurons(130, d, seed=1)
    w.add(k, b, v * 5, edit_id="a")
    first = logits(True)
    before = packed()
    assert list(before) == [(0, 64), (64, 128)]  # 2 plain
    assert torch.allclose(first, logits(False), atol=1e-5)
    k2, b2, v2 = random_neurons(20, d, seed=2)
    w.add(k2, b2 + 3.0, v2 * 50, edit_id="b")  # fires everywhere
    second = logits(True)
    now = packed()
    assert list(now) == [(0, 64), (64, 128), (128, 144)] and all(now[key] is before[key] for key in before)
    assert not torch.allclose(second, first, atol=1e-3) and torch.allclose(second, logits(False), atol=1e-5)
    w.add(*random_neurons(60, d, seed=3), edit_id="c")  # 210 neurons: three large blocks, one small
    logits(True)
    assert list(packed()) == [(0, 64), (64, 128), (128, 192), (192, 208)]
    assert all(packed()[key] is before[key] for key in before)
    w.remove(["b", "c"])
    assert torch.equal(logits(True), first) and packed()[(0, 64)] is not before[(0, 64)]  # packed anew
    state = {key: t.clone() for key, t in w.state_dict().items() if key in ("keys", "biases", "values")}
    state["keys"] = -state["keys"]
    w.load_state_dict(state, strict=False)  # copies into the same tensors: only their version changes
    flipped = logits(True)
    assert not torch.allclose(flipped, first, atol=1e-3) and torch.allclose(flipped, logits(False), atol=1e-5)
