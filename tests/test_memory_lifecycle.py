"""The transition table: every legal change passes, every illegal one raises (through the Store)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from memory import lifecycle
from memory.lifecycle import TRANSITIONS, IllegalTransition, Status
from memory.schema import Mistake, StatusChange
from memory.store import Store
from tests.test_memory_store import report


def test_every_status_has_a_row() -> None:
    assert set(TRANSITIONS) == set(Status)
    assert all(target in Status for targets in TRANSITIONS.values() for target in targets)
    assert all(status not in TRANSITIONS[status] for status in Status)  # no self-loops


def test_patched_and_terminal_paths() -> None:
    assert lifecycle.is_legal(Status.PATCHING, Status.QUEUED)  # crash recovery
    assert not lifecycle.is_legal(Status.PATCHED, Status.QUEUED)  # a kept neuron is never re-queued
    assert not lifecycle.is_legal(Status.REPORTED, Status.PATCHING)  # the policy must queue first


def _mistake_in(store: Store, status: Status, text: str) -> int:
    store.record_batch([report(f"e-{text}", text)])
    with store._writing() as session:
        mistake = session.scalars(select(Mistake).where(Mistake.input_text == text)).one()
        mistake.status = status  # test set-up only: put the row in the state under test
        return mistake.id


ALL_PAIRS = [(a, b) for a in Status for b in Status if a != b]


def test_every_pair_of_statuses(store: Store) -> None:
    """All 72 ordered pairs: legal ones change the row and log it, illegal ones raise and change nothing."""
    for current, wanted in ALL_PAIRS:
        mid = _mistake_in(store, current, f"{current}->{wanted}")
        if wanted in TRANSITIONS[current]:
            store.set_status(mid, wanted, note="test")
            assert store.get_mistake(mid).status == wanted  # type: ignore[union-attr]
            with store._reading() as session:
                change = session.scalars(select(StatusChange).where(StatusChange.mistake_id == mid)).one()
                assert (change.from_status, change.to_status, change.note) == (current, wanted, "test")
        else:
            with pytest.raises(IllegalTransition, match=f"{current} -> {wanted}"):
                store.set_status(mid, wanted)
            assert store.get_mistake(mid).status == current  # type: ignore[union-attr]


def test_history_is_recorded_on_both_backends(store: Store) -> None:
    store.record_batch([report("e1", "x")])
    mistake = store.next_mistake("m")
    assert mistake is not None
    store.set_status(mistake.id, Status.FAILED, note="CUDA out of memory")
    store.set_status(mistake.id, Status.QUEUED)
    with store._reading() as session:
        rows = session.execute(select(StatusChange.from_status, StatusChange.to_status).order_by(StatusChange.id)).all()
    assert [(str(a), str(b)) for a, b in rows] == [
        ("reported", "queued"),
        ("queued", "patching"),
        ("patching", "failed"),
        ("failed", "queued"),
    ]
