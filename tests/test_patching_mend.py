"""MEND on tiny random models: gradient capture, the cached top stack, the untrained editor, training,
save/load and resume, and `patchd evaluate --editor mend` (sequential and single-edit)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from patching.bases.datasets import Example
from patching.bases.load import load_base
from patching.bases.tasks import TaskAdapter
from patching.eval.mend import store
from patching.eval.mend.data import build
from patching.eval.mend.nets import MendNet, RunningStats
from patching.eval.mend.stack import GradCapture, TopStack, select_targets, target_modules
from patching.eval.mend.train import MendTrainConfig, MendTrainer, train
from tests.fixtures_models import tiny_model
from tests.tinybase import WORDS, tiny_base

CFG = MendTrainConfig(rank=32, n_layers=2, val_edits=40, loc_batch=4, val_every=0, checkpoint_minutes=100)


def _batch(model_type: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(3, 60, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # one padded example
    if model_type == "bert":  # classification: position 0 of each example
        return (
            {"input_ids": ids, "attention_mask": mask},
            torch.arange(2),
            torch.zeros(2, dtype=torch.long),
            torch.tensor([1, 0]),
        )
    return (
        {"input_ids": ids, "attention_mask": mask},
        torch.tensor([0, 0, 1, 1]),
        torch.tensor([3, 5, 2, 3]),
        torch.tensor([5, 9, 11, 2]),
    )


def _rows(logits: torch.Tensor, rb: torch.Tensor, rt: torch.Tensor) -> torch.Tensor:
    return logits[rb] if logits.ndim == 2 else logits[rb, rt]


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_capture_sum_of_rank_one_terms_is_the_weight_gradient(model_type: str) -> None:
    model = tiny_model(model_type)
    targets = select_targets(model, n_layers=2)
    assert len(targets) == 4 and all(".attention." not in t.name for t in targets)
    params = dict(model.named_parameters())
    model.requires_grad_(False)
    for t in targets:
        params[t.name].requires_grad_(True)
    batch, rb, rt, y = _batch(model_type)
    with GradCapture(target_modules(model, targets)) as cap:
        loss = F.cross_entropy(_rows(model(**batch).logits, rb, rt), y)
        rows = cap.rows(loss, retain_graph=True)
    loss.backward()
    for t in targets:
        u, delta = rows[t.name]
        assert u.shape[0] > 0 and (u != 0).any(-1).all() and (delta != 0).any(-1).all()  # zero rows dropped
        torch.testing.assert_close(delta.T @ u, params[t.name].grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_top_stack_on_cached_input_matches_the_full_model(model_type: str) -> None:
    model = tiny_model(model_type)
    model.requires_grad_(False)
    targets = select_targets(model, n_layers=1)
    stack = TopStack(model, targets[0].layer)
    batch, rb, rt, _ = _batch(model_type)
    cached = stack.capture(batch)
    with torch.no_grad():
        full = _rows(model(**batch).logits, rb, rt)
        torch.testing.assert_close(stack.logits(cached, rb, rt), full, rtol=1e-5, atol=1e-5)
        # edited weights through functional_call == the same weights written into the model
        params = dict(model.named_parameters())
        new = {t.name: params[t.name] + 0.05 * torch.randn(t.shape) for t in targets}
        functional = stack.logits(cached, rb, rt, new, targets)
        for t in targets:
            params[t.name].copy_(new[t.name])
        torch.testing.assert_close(functional, _rows(model(**batch).logits, rb, rt), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(functional, full)


def test_running_stats_match_torch_and_refuse_when_empty() -> None:
    rs = RunningStats(5)
    with pytest.raises(RuntimeError, match="not initialised"):
        rs.normalise(torch.zeros(1, 5))
    parts = [torch.randn(n, 5) * 3 + 1 for n in (1, 7, 30)]
    for x in parts:
        rs.update(x)
    allx = torch.cat(parts).double()
    torch.testing.assert_close(rs.mean, allx.mean(0))
    torch.testing.assert_close(rs.std(), allx.std(0))
    assert rs.initialised()


def test_lrlinear_learns_from_its_identity_init() -> None:
    """At init every pre-activation is exactly 0; the relu must still pass gradient to U there."""
    net = MendNet(["w"], [(6, 4)], rank=3)
    net.train()
    rows = {"w": (torch.randn(8, 4), torch.randn(8, 6))}
    net.updates(rows)["w"].sum().backward()
    assert all(float(layer.u.grad.abs().sum()) > 0 for layer in net.transforms["6x4"].mlp)


def _tiny(tmp_path: Path) -> tuple[object, list[Example]]:
    lb = load_base(str(tiny_base(tmp_path)))
    rng = random.Random(0)
    pool = [Example(" ".join([WORDS[i]] + rng.choices(WORDS[300:], k=6)), "") for i in range(300)]
    return lb, pool


def test_untrained_editor_leaves_outputs_nearly_unchanged(tmp_path: Path) -> None:
    lb, pool = _tiny(tmp_path)
    model = lb.model
    targets = select_targets(model, n_layers=2)
    torch.manual_seed(0)
    net = MendNet([t.name for t in targets], [t.shape for t in targets], rank=32)
    trainer = MendTrainer(model, net, targets, CFG)
    data = build(TaskAdapter(lb), trainer.stack, pool, "tiny", val=40, loc_batch=4, progress=False)
    net.train()
    for item in data.edits[:20]:  # statistics only: no optimiser step
        net.updates(trainer.edit_rows(item))
    net.eval()
    with torch.no_grad():
        for item in data.val_edits[:10]:
            params = trainer.edited(trainer.edit_rows(item))
            for it in (item, data.val_loc):
                before = trainer.stack.logits(it.cached, it.rows_b, it.rows_t)
                after = trainer.stack.logits(it.cached, it.rows_b, it.rows_t, params, targets)
                assert float((after - before).abs().max()) < 2e-3  # identity editor, α = 1e-4
    assert trainer.validate(data)["edit_success"] < 0.2  # and the edits do not take


def test_training_makes_single_edits_succeed_and_round_trips(tmp_path: Path) -> None:
    lb, pool = _tiny(tmp_path)
    out = tmp_path / "editor"
    summary = train(lb, pool, "tiny synthetic", out, CFG, steps=250, progress=False, log=lambda _m: None)
    assert summary["steps"] == 250 and summary["nan_skipped"] == 0
    val = summary["validation"][-1]
    assert val["edit_success"] >= 0.8  # binary flips: an untrained editor gets < 0.2 (test above)
    assert val["loc_unchanged"] > 0.5
    config = json.loads((out / store.CONFIG_FILE).read_text())
    assert [e["name"] for e in config["edited"]] == [t.name for t in select_targets(lb.model, 2)]
    assert config["net"]["rank"] == 32 and config["training"]["step"] == 250

    # save/load: the same tensors and the same update for the same gradient rows
    net, _ = store.load(out)
    trained_state = {k: v.clone() for k, v in net.state_dict().items()}
    targets = select_targets(lb.model, 2)
    trainer = MendTrainer(lb.model, net, targets, CFG)
    data = build(TaskAdapter(lb), trainer.stack, pool, "tiny", val=40, loc_batch=4, progress=False)
    net.eval()
    rows = trainer.edit_rows(data.val_edits[0])
    again, _ = store.load(out)
    again.eval()
    with torch.no_grad():
        for name, upd in net.updates(rows).items():
            torch.testing.assert_close(again.updates(rows)[name], upd)
    # resume: the step count continues, the optimiser state is restored
    summary2 = train(lb, pool, "tiny synthetic", out, CFG, steps=260, progress=False, log=lambda _m: None)
    assert summary2["steps"] == 260 and summary2["this_run"]["steps"] == 10
    resumed, _ = store.load(out)
    assert any(not torch.equal(resumed.state_dict()[k], v) for k, v in trained_state.items())


def test_evaluate_with_mend_sequential_and_single(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from patching.eval.evaldata import EvalData
    from patching.eval.evaluate import run_evaluate

    monkeypatch.setattr("patching.eval.mend.editor.KEPT_BATCH", 4)  # earlier edits re-captured in padded batches

    lb, pool = _tiny(tmp_path)
    out = tmp_path / "editor"
    train(lb, pool, "tiny synthetic", out, CFG, steps=150, progress=False, log=lambda _m: None)
    rng = random.Random(5)

    def sent(i: int) -> str:
        return " ".join([WORDS[i]] + rng.choices(WORDS[300:], k=6))

    labels = ["SUPPORTS", "REFUTES"]
    data = EvalData(
        "tiny",
        [Example(sent(300 + i), rng.choice(labels)) for i in range(20)],
        heldout=[Example(sent(320 + i), "") for i in range(40)],
        test=[Example(sent(360 + i), rng.choice(labels)) for i in range(20)],
    )
    reports = {}
    for seq in (True, False):
        reports[seq] = run_evaluate(
            str(lb.directory),
            data,
            editor="mend",
            sequential=seq,
            editor_options={"mend_dir": out},
            progress=lambda _m: None,
        )
    seq, single = reports[True], reports[False]
    assert single["sequential"] is False and single["er"] is None and single["locality"] is None
    assert seq["er"] is not None and seq["locality"] is not None
    assert single["edits"] == single["stream"]  # the model is reset: nothing is fixed along the way
    for rep in (seq, single):
        done = [r for r in rep["rows"] if "sr" in r]
        assert all(r["status"] == "applied" and "would_pass" in r["gate"] for r in done)
        assert rep["gate_would_reject"] == sum(not r["gate"]["would_pass"] for r in done)
        assert rep["editor_summary"]["gate_checked"] == len(done)
    assert single["sr"] >= 0.6
    # the emulated gate's retention count is the stream's own: earlier edits wrong right now
    seq_rows = [r for r in seq["rows"] if "sr" in r]
    assert seq_rows[-1]["gate"]["retention_failed"] == sum(not r["right_at_end"] for r in seq_rows[:-1])
    # after a single-edit run the base weights are back
    assert all(v == 0 for v in reports[False]["editor_summary"]["weight_relative_change_now"].values())
