"""A restart restores the engine snapshot instead of replaying every patch, and is then the
uninterrupted run bit for bit: same neurons, same caches, same next gate decision."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch

from patching import snapshot
from patching.engine import Patcher
from tests.test_patching_behaviour import batch, predict, setup

META = {"model": "tiny", "base_sha256": "0" * 64}


def assert_same_engine(a: Patcher, b: Patcher) -> None:
    """Every tensor an edit changes, compared bit for bit (torch.equal), and the edit order."""
    assert a.edit_ids == b.edit_ids and a.wrapper.edit_ids == b.wrapper.edit_ids
    for name in ("keys", "biases", "values"):
        assert torch.equal(getattr(a.wrapper, name), getattr(b.wrapper, name)), name
    assert torch.equal(a.memory.view(), b.memory.view())
    assert a.heldout is not None and b.heldout is not None
    assert torch.equal(a.heldout.ffn, b.heldout.ffn) and torch.equal(a.heldout.pred, b.heldout.pred)
    assert (a.retention is None) == (b.retention is None)
    if a.retention is not None and b.retention is not None:
        for name in ("q", "ffn", "residual", "targets", "group"):
            assert torch.equal(getattr(a.retention, name), getattr(b.retention, name)), name


def _edit(patcher: Patcher, edits: torch.Tensor, targets: torch.Tensor, i: int) -> None:
    out = patcher.edit(batch(edits[i : i + 1], targets[i : i + 1]), edit_id=f"e{i}")
    assert out.status == "accepted", out.reasons


def test_a_restored_snapshot_continues_exactly_as_the_uninterrupted_run(tmp_path: Path) -> None:
    whole, heldout, edits = setup()
    targets = 1 - predict(whole.model, edits)
    for i in range(8):
        _edit(whole, edits, targets, i)
    nxt = whole.propose(batch(edits[8:9], targets[8:9]), "e8")

    first, _, _ = setup()  # the process that stopped after 4 edits and wrote its snapshot
    for i in range(4):
        _edit(first, edits, targets, i)
    path = tmp_path / "engine" / "tiny.safetensors"
    assert snapshot.save(path, first.export_state(), META) > 0

    restarted, _, _ = setup()  # a fresh process: base caches only, then the snapshot
    state, meta = snapshot.load(path, META)
    restarted.restore_state(state)
    assert_same_engine(restarted, first)
    assert torch.equal(predict(restarted.model, heldout), predict(first.model, heldout))
    for i in range(4, 8):  # the same stream goes on: trained and gated on the restored caches
        _edit(restarted, edits, targets, i)
    assert_same_engine(restarted, whole)
    # the next gate decision is the uninterrupted run's: same neurons, same verdict
    again = restarted.propose(batch(edits[8:9], targets[8:9]), "e8")
    assert nxt is not None and again is not None
    assert torch.equal(nxt.neurons.keys, again.neurons.keys) and torch.equal(nxt.neurons.values, again.neurons.values)
    assert nxt.gate.to_dict() == again.gate.to_dict()


def test_a_snapshot_for_something_else_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    patcher, _, edits = setup()
    targets = 1 - predict(patcher.model, edits)
    _edit(patcher, edits, targets, 0)
    path = tmp_path / "s.safetensors"
    snapshot.save(path, patcher.export_state(), META)
    with pytest.raises(snapshot.SnapshotUnusable, match="base_sha256"):
        snapshot.load(path, {**META, "base_sha256": "1" * 64})
    with pytest.raises(snapshot.SnapshotUnusable, match="no snapshot"):
        snapshot.load(tmp_path / "missing.safetensors", META)
    path.write_bytes(path.read_bytes()[:100])  # torn (the atomic write prevents it; a disk may not)
    with pytest.raises(snapshot.SnapshotUnusable, match="unreadable"):
        snapshot.load(path, META)
    # a state from other held-out inputs does not fit this Patcher's caches: refused before any change
    state = patcher.export_state()
    fresh, _, _ = setup()
    assert state.heldout_ffn is not None
    state.heldout_ffn = state.heldout_ffn[:-1]
    with pytest.raises(ValueError, match="held-out rows"):
        fresh.restore_state(state)
    assert fresh.wrapper.n == 0 and fresh.edit_ids == []
    with pytest.raises(ValueError, match="fresh Patcher"):
        patcher.restore_state(patcher.export_state())


def test_the_daemon_restores_a_snapshot_only_of_the_stores_first_patches_unchanged(tmp_path: Path) -> None:
    from daemon.model import PatchedModel
    from daemon.settings import Settings

    def daemon_model(patcher: Patcher) -> PatchedModel:
        return PatchedModel(
            Settings(), cast(Any, None), cast(Any, None), patcher, 0.0, tmp_path / "s.safetensors", META
        )

    writer = daemon_model(setup()[0])
    patcher = writer.patcher
    edits = setup()[2]
    targets = 1 - predict(patcher.model, edits)
    records = []  # what Store.accepted_patches gives: id, mistake id, stored neuron bytes
    for i in range(4):
        proposal = patcher.propose(batch(edits[i : i + 1], targets[i : i + 1]), edit_id=str(i + 1))
        assert proposal is not None and proposal.accepted
        row = writer.patch_row(proposal)
        writer.commit(proposal, 10 + i, row)
        records.append(SimpleNamespace(id=10 + i, mistake_id=i + 1, neurons=row.neurons))
    assert writer.save_snapshot() and not writer.save_snapshot()  # nothing new: not written again
    stored = cast(Any, records)

    restarted = daemon_model(setup()[0])
    assert restarted._restore(stored) == 4
    assert_same_engine(restarted.patcher, patcher)
    # the store holds more (accepted after the snapshot): its prefix is restored, the rest replays
    assert daemon_model(setup()[0])._restore(stored + [SimpleNamespace(id=99, mistake_id=9, neurons=b"")]) == 4
    # a revoked patch, a changed neuron blob, or a store that holds fewer: all replayed, nothing restored
    for other in (
        [records[0], records[2], records[3]],
        [*records[:3], SimpleNamespace(id=13, mistake_id=4, neurons=records[3].neurons + b" ")],
        records[:3],
    ):
        fresh = daemon_model(setup()[0])
        assert fresh._restore(cast(Any, other)) == 0
        assert fresh.patcher.wrapper.n == 0 and fresh.patcher.edit_ids == [] and fresh._patches == 0
