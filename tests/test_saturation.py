"""relu-cap: capping a trained relu neuron (patching/saturation.py), and the engine running it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from patching.config import TrainConfig
from patching.gate import HeldoutTensors
from patching.layer import activate, neuron_output
from patching.saturation import band, cap, saturations
from patching.trainer import Neurons
from tests.test_patching_behaviour import batch, predict, setup


def one_neuron() -> tuple[Neurons, torch.Tensor]:
    """A neuron k = e0, b = 0 and edit rows whose pre-activations are 2 and 0.5 (peak 2)."""
    d = 4
    nr = Neurons(torch.eye(d)[:1].clone(), torch.zeros(1), torch.tensor([[0.0, 1.0, -1.0, 0.5]]))
    q_edit = torch.tensor([[2.0, 0.3, 0.0, 0.0], [0.5, 0.0, 1.0, 0.0]])
    return nr, q_edit


def out(nr: Neurons, q: torch.Tensor, activation: str) -> torch.Tensor:
    return neuron_output(q, nr.keys, nr.biases, nr.values, activation)  # type: ignore[arg-type]


def test_relu_cap_activation_is_relu_clamped_at_one_and_unknown_names_fail() -> None:
    pre = torch.tensor([-1.0, 0.0, 0.4, 1.0, 7.0])
    assert torch.equal(activate(pre, "relu-cap"), torch.tensor([0.0, 0.0, 0.4, 1.0, 1.0]))
    with pytest.raises(ValueError, match="unknown patch activation 'tanh'"):
        activate(pre, "tanh")  # type: ignore[arg-type]


def test_cap_at_one_gives_the_relu_output_on_the_edit_and_never_more_elsewhere() -> None:
    nr, q_edit = one_neuron()
    capped = cap(nr, q_edit, 1.0)
    assert torch.allclose(out(capped, q_edit, "relu-cap"), out(nr, q_edit, "relu"))
    q = torch.tensor([[5.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [-3.0, 1.0, 0.0, 0.0]])
    # pre-activation 5 is past the edit's peak (2): capped at the peak's output; 1 is unchanged; -3 silent
    assert torch.allclose(
        out(capped, q, "relu-cap"), torch.stack([2.0 * nr.values[0], 1.0 * nr.values[0], torch.zeros(4)])
    )


def test_saturation_gives_weaker_inputs_the_edits_full_output_and_keeps_silent_ones_silent() -> None:
    nr, q_edit = one_neuron()
    capped = cap(nr, q_edit, 3.0)
    full = 2.0 * nr.values[0]  # the relu's output at the edit's peak row
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0 / 3.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0], [-0.1, 0.0, 0.0, 0.0]])
    got = out(capped, q, "relu-cap")
    assert torch.allclose(got[0], full) and torch.allclose(got[1], full, atol=1e-6)  # half and a third of the peak
    assert torch.allclose(got[2], 0.75 * full)  # a quarter of the peak: 3/4 of the way
    assert torch.equal(got[3], torch.zeros(4))  # silent under relu: silent capped
    # the plain relu gave the weaker inputs only their share
    assert torch.allclose(out(nr, q[:1], "relu")[0], 0.5 * full)


def test_a_neuron_silent_on_the_edit_keeps_its_weights() -> None:
    nr = Neurons(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0.0, -5.0]), torch.ones(2, 2))
    capped = cap(nr, torch.tensor([[1.0, 1.0]]), 3.0)
    assert torch.isfinite(capped.keys).all()
    assert torch.equal(capped.keys[1], nr.keys[1]) and torch.equal(capped.values[1], nr.values[1])
    assert torch.allclose(capped.keys[0], torch.tensor([3.0, 0.0]))


def test_the_engine_tries_the_bold_cap_first_then_one() -> None:
    assert saturations(3.0) == (3.0, 1.0)
    assert saturations(1.0) == (1.0,)


def test_config_rejects_a_saturation_below_one() -> None:
    with pytest.raises(ValueError, match="trainer.saturation"):
        TrainConfig(activation="relu-cap", saturation=0.5)
    with pytest.raises(ValueError, match="trainer.band"):
        TrainConfig(band=0.5)


def test_a_band_gives_the_edit_its_output_and_nothing_beyond_or_below_it() -> None:
    nr = Neurons(torch.eye(4)[:1].clone(), torch.zeros(1), torch.tensor([[0.0, 1.0, -1.0, 0.5]]))
    q_edit = torch.tensor([[2.0, 0.3, 0.0, 0.0]])  # pre-activation 2 on the edit
    banded = band(nr, q_edit, 0.1)
    assert banded.n == 2 and torch.equal(banded.keys[0], banded.keys[1] * 1.0)  # one key direction, two edges
    full = 2.0 * nr.values[0]  # what the relu gives the edit
    # pre-activations (the first coordinate): the edit, inside the band, the ramps, far below, far beyond
    u = torch.tensor([2.0, 1.85, 2.15, 1.7, 2.3, 1.5, 0.0, -1.0, 2.5, 7.0])
    q = torch.zeros(u.numel(), 4)
    q[:, 0] = u
    got = out(banded, q, "relu-cap")
    assert torch.allclose(got[0], full) and torch.allclose(got[1], full) and torch.allclose(got[2], full)
    assert torch.allclose(got[3], 0.5 * full, atol=1e-5) and torch.allclose(got[4], 0.5 * full, atol=1e-5)
    assert torch.equal(got[5:8], torch.zeros(3, 4))  # below 1 - 2w of the edit: exactly silent
    assert torch.allclose(got[8:], torch.zeros(2, 4), atol=1e-6)  # beyond 1 + 2w: the edges cancel
    # the relu itself fires hardest beyond the edit: what the band is for
    assert out(nr, q[9:], "relu-cap").abs().sum() > 0


def test_a_band_of_several_edit_rows_covers_them_all_and_a_silent_neuron_stays_silent() -> None:
    nr, q_edit = one_neuron()  # edit rows at pre-activations 2 and 0.5
    got = out(band(nr, q_edit, 0.05), q_edit, "relu-cap")
    assert torch.allclose(got, (2.0 * nr.values[0]).expand(2, 4))
    silent = Neurons(torch.tensor([[0.0, 1.0, 0.0, 0.0]]), torch.tensor([-5.0]), torch.ones(1, 4))
    pair = band(silent, q_edit, 0.05)
    assert torch.isfinite(pair.keys).all() and torch.equal(pair.values, torch.zeros(2, 4))


def test_twenty_sequential_relu_cap_edits_succeed_and_keep_everything_else() -> None:
    patcher, heldout, edits = setup(train=TrainConfig(max_steps=300, activation="relu-cap"))
    model = patcher.model
    held_before = predict(model, heldout)
    targets = 1 - predict(model, edits)
    caps = []
    for i in range(20):
        outcome = patcher.edit(batch(edits[i : i + 1], targets[i : i + 1]), edit_id=f"e{i}")
        assert outcome.status == "accepted", outcome.reasons
        assert outcome.proposal is not None
        caps.append(outcome.proposal.saturation)
        assert predict(model, edits[i : i + 1]).item() == targets[i].item()  # the real forward, capped neurons
    assert torch.equal(predict(model, edits), targets)
    assert torch.equal(predict(model, heldout), held_before)
    assert set(caps) <= {3.0, 1.0} and 3.0 in caps
    assert patcher.wrapper.activation == "relu-cap"


@pytest.mark.parametrize("width", [0.0, 0.05])
def test_an_edit_refused_for_a_held_out_input_beyond_it_is_kept_as_a_band(width: float) -> None:
    """A held-out row that projects twice as far as the edit on any key the trainer can find
    (its FFN input is 2 q_edit, its other tensors the edit's): every relu attempt changes its
    prediction, the band leaves it alone."""
    patcher, _, edits = setup(train=TrainConfig(max_steps=300, activation="relu-cap", band=width))
    model = patcher.model
    ids = edits[:1]
    target = 1 - predict(model, ids)
    et = patcher.cache(batch(ids, target))
    beyond = HeldoutTensors(2.0 * et.q, et.ffn, et.residual, 1 - target, torch.zeros(1, dtype=torch.long))
    assert patcher.heldout is not None
    h = patcher.heldout
    patcher.heldout = HeldoutTensors(
        torch.cat([h.q, beyond.q]),
        torch.cat([h.ffn, beyond.ffn]),
        torch.cat([h.residual, beyond.residual]),
        torch.cat([h.pred, beyond.pred]),
        torch.cat([h.group, beyond.group + h.examples]),
    )
    proposal = patcher.propose(batch(ids, target), "beyond")
    assert proposal is not None
    if width == 0.0:  # the band off: refused after every retry, for that row
        assert not proposal.accepted and not proposal.banded
        assert any(r.startswith("locality: 1 ") for r in proposal.gate.reasons)
        return
    assert proposal.accepted and proposal.banded and proposal.neurons.n == 2
    assert proposal.attempts == patcher.gate_cfg.retries + 1  # the regular attempts came first
    patcher.commit(proposal)
    assert int(predict(model, ids)) == int(target)
    pre = (2.0 * et.q) @ proposal.neurons.keys.T + proposal.neurons.biases
    assert (pre >= 1.0).all()  # both edges saturated on the row beyond: their outputs cancel


def test_the_tpatcher_editor_steps_aside_for_the_overhead_baseline_and_comes_back() -> None:
    from patching.eval.editors import TPatcherEditor

    patcher, heldout, edits = setup(train=TrainConfig(max_steps=300, activation="relu-cap"))
    model = patcher.model
    before = predict(model, edits[:3])
    for i in range(3):
        target = 1 - before[i : i + 1]
        proposal = patcher.propose(batch(edits[i : i + 1], target), str(i))
        assert proposal is not None and proposal.accepted
        patcher.commit(proposal)
    editor = TPatcherEditor(patcher, adapter=None)  # type: ignore[arg-type]
    n = patcher.wrapper.n
    assert editor.parameters_added == n * (2 * patcher.site.hidden_size + 1)
    with editor.disabled():
        assert torch.equal(predict(model, edits[:3]), before) and patcher.wrapper.n == 0
    assert torch.equal(predict(model, edits[:3]), 1 - before) and patcher.wrapper.n == n


@pytest.mark.parametrize("on", [False, True])
def test_a_generation_edit_refused_for_a_held_out_answer_is_kept_as_a_band_that_generates(
    tmp_path: Path, on: bool
) -> None:
    """trainer.band_generation: the same rescue on a causal LM, each neuron's band spanning its
    answer rows; the banded edit must still generate its target (the engine runs generate())."""
    from patching.bases.load import load_base
    from patching.bases.tasks import TaskAdapter
    from patching.config import GateConfig
    from patching.engine import Patcher
    from tests.fixtures_models import tiny_llama_dir

    adapter = TaskAdapter(load_base(str(tiny_llama_dir(tmp_path))))
    train = TrainConfig(max_steps=300, activation="relu-cap", band_generation=on)
    memory = [f"what is thing {i}? and how {i}" for i in range(40)]
    heldout = ["what?"]
    patcher = Patcher(adapter.base.model, train=train, gate=GateConfig())
    patcher = adapter.patcher(patcher, memory, heldout, progress=False, cache=False)
    before = adapter.predict(heldout)
    # on this tiny random model every regular attempt at this edit moves the held-out answer
    proposal = patcher.propose(adapter.edit("Where is Rome?", "1"), "rome")
    assert proposal is not None and proposal.attempts == patcher.gate_cfg.retries + 1
    if not on:
        assert not proposal.accepted and not proposal.banded
        assert proposal.gate.reasons == ["locality: 1 held-out prediction(s) changed (max 0)"]
        return
    assert proposal.accepted and proposal.banded
    assert proposal.neurons.n % 2 == 0  # a rising and a falling edge per trained neuron
    patcher.commit(proposal)
    assert adapter.predict(["Where is Rome?"])[0].startswith("1")  # real greedy decoding
    assert adapter.predict(heldout) == before
