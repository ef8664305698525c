"""The Store's behaviour on both backends: ingest, policy, patches, recovery, versions."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.exc import IntegrityError

from memory.fingerprint import fingerprint, input_key, normalise_input
from memory.lifecycle import IllegalTransition, Status
from memory.migrate import SchemaOutOfDate
from memory.records import PatchIn, RejectedIn, ReportIn
from memory.store import NotFound, Store

_offsets = itertools.count()


def report(
    event_id: str,
    text: str,
    target: str = "A",
    reporter: str | None = "alice",
    model: str = "m",
    equivalents: tuple[str, ...] = (),
) -> ReportIn:
    return ReportIn(
        event_id=event_id,
        model=model,
        fingerprint=fingerprint(model, text),
        input_text=input_key(normalise_input(text)),
        target=target,
        raw=f'{{"id": "{event_id}"}}'.encode(),
        topic="corrections",
        partition=0,
        offset=next(_offsets),
        reporter=reporter,
        equivalents=equivalents,
    )


def claim(store: Store, text: str, model: str = "m") -> int:
    """Report `text` once and claim it for patching; returns the mistake id."""
    store.record_batch([report(f"claim-{text}", text, model=model)])
    mistake = store.next_mistake(model)
    assert mistake is not None and mistake.input_text == text
    return mistake.id


def patch_in(neurons: bytes = b"n", accepted: bool = True, n_neurons: int = 1, locality: float = 1.0) -> PatchIn:
    return PatchIn(neurons=neurons, n_neurons=n_neurons, layer=-1, activation="relu", steps=12, seconds=0.1,
                   gate={"locality": locality}, accepted=accepted)  # fmt: skip


def add_patch(store: Store, mistake_id: int, accepted: bool = True) -> int:
    return store.add_patch(mistake_id, patch_in(accepted=accepted))


def test_batch_counts_reports_duplicates_and_mistakes(store: Store) -> None:
    result = store.record_batch(
        [
            report("e1", "the sky is green"),
            report("e2", "the  sky is green\n", reporter="bob"),
            report("e2", "the sky is green", reporter="bob"),
            report("e3", "water is dry"),
        ]
    )
    assert (result.new_reports, result.duplicates, result.mistakes_created, result.mistakes_updated) == (
        3,
        1,
        2,
        0,
    )

    again = store.record_batch([report("e1", "the sky is green"), report("e4", "water is dry", target="B")])
    assert (again.new_reports, again.duplicates, again.mistakes_created, again.mistakes_updated) == (
        1,
        1,
        0,
        1,
    )

    sky = store.find_mistake("m", fingerprint("m", "the sky is green"))
    water = store.find_mistake("m", fingerprint("m", "water is dry"))
    assert sky is not None and water is not None
    assert (sky.report_count, sky.reporter_count, sky.targets, sky.status) == (
        2,
        2,
        {"A": 2},
        Status.REPORTED,
    )
    assert (water.report_count, water.reporter_count, water.targets) == (2, 1, {"A": 1, "B": 1})
    assert sky.input_text == "the sky is green"
    assert store.table_counts()["reports"] == 4


def test_case_is_kept_and_models_are_separate(store: Store) -> None:
    store.record_batch([report("e1", "Paris"), report("e2", "paris"), report("e3", "Paris", model="other")])
    assert store.table_counts()["mistakes"] == 3


def test_anonymous_reports_count_as_one_reporter(store: Store) -> None:
    store.record_batch([report(f"e{i}", "x", reporter=None) for i in range(3)] + [report("e9", "x", reporter="bob")])
    mistake = store.find_mistake("m", fingerprint("m", "x"))
    assert mistake is not None and mistake.reporter_count == 2 and mistake.report_count == 4


def test_empty_batch_is_a_no_op(store: Store) -> None:
    assert store.record_batch([]).new_reports == 0
    assert store.table_counts()["reports"] == 0


def test_rejected_events_are_stored_once(store: Store) -> None:
    bad = RejectedIn(
        raw=b"\xff not json",
        reason="invalid_json",
        detail="byte 0",
        topic="corrections",
        partition=1,
        offset=7,
    )
    assert store.record_rejected([bad]) == 1
    assert store.record_rejected([bad]) == 0
    assert store.table_counts()["rejected"] == 1
    other = RejectedIn(raw=b"{}", reason="missing_field", detail="target", topic="other", partition=0, offset=7)
    store.record_rejected([other])
    assert store.rejected_offsets("corrections") == {(1, 7): "invalid_json"}
    assert store.rejected_offsets("other") == {(0, 7): "missing_field"}


def test_reporter_counts_in_a_window(store: Store) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    store.record_batch(
        [
            report("e1", "a"),
            report("e2", "b"),
            report("e3", "c", reporter="bob"),
            report("e4", "d", reporter=None),
        ]
    )
    assert store.reporter_counts("m", before) == {"alice": 2, "bob": 1, "": 1}
    assert store.reporter_counts("m", datetime.now(UTC) + timedelta(seconds=1)) == {}
    assert store.reporter_counts("other", before) == {}


def test_quorum_counts_distinct_reporters(store: Store) -> None:
    store.record_batch([report("e1", "x", reporter="alice"), report("e2", "x", reporter="alice")])
    assert store.next_mistake("m", quorum=2) is None
    store.record_batch([report("e3", "x", reporter="bob")])
    mistake = store.next_mistake("m", quorum=2)
    assert mistake is not None and mistake.status == Status.PATCHING and mistake.target == "A"


def test_conflicts_need_a_share_above_the_setting(store: Store) -> None:
    store.record_batch([report("e1", "x", "A", "u1"), report("e2", "x", "B", "u2")])
    assert store.next_mistake("m", conflict_share=0.5) is None  # 50/50 is a tie
    assert store.status_counts("m")[Status.CONFLICTING] == 1

    store.record_batch([report("e3", "x", "A", "u3")])  # A: 2/3 > 0.5
    assert store.next_mistake("m", conflict_share=0.7, claim=False) is None  # 0.67 is not above 0.7
    mistake = store.next_mistake("m", conflict_share=0.6, claim=False)  # no new reports: not re-evaluated
    assert mistake is None
    store.record_batch([report("e4", "x", "A", "u4")])  # A: 3/4 > 0.7
    mistake = store.next_mistake("m", conflict_share=0.7)
    assert mistake is not None and mistake.target == "A" and mistake.targets == {"A": 3, "B": 1}


def test_queued_mistake_becomes_conflicting_on_disagreement(store: Store) -> None:
    store.record_batch([report("e1", "x", "A", "u1")])
    assert store.next_mistake("m", claim=False) is not None  # queued, not claimed
    store.record_batch([report("e2", "x", "B", "u2")])
    assert store.next_mistake("m") is None
    assert store.status_counts("m")[Status.CONFLICTING] == 1


def test_order_is_priority_then_reporters_then_age(store: Store) -> None:
    store.record_batch([report("old", "old one", reporter="u1")])
    store.record_batch([report("new", "new one", reporter="u1")])
    store.record_batch([report(f"pop{i}", "popular", reporter=f"u{i}") for i in range(3)])
    urgent = store.record_batch([report("urgent", "urgent one", reporter="u9")])
    assert urgent.mistakes_created == 1
    urgent_id = store.find_mistake("m", fingerprint("m", "urgent one")).id  # type: ignore[union-attr]
    store.set_priority(urgent_id, 10)
    order = []
    while (mistake := store.next_mistake("m")) is not None:
        order.append(mistake.input_text)
    assert order == ["urgent one", "popular", "old one", "new one"]


def test_next_mistake_returns_equivalents_of_the_winning_target(store: Store) -> None:
    store.record_batch(
        [
            report("e1", "x", "A", "u1", equivalents=("x1", "x2")),
            report("e2", "x", "A", "u2", equivalents=("x2", "x3")),
            report("e3", "x", "B", "u3", equivalents=("wrong",)),
            report("e4", "x", "A", "u4"),
        ]
    )
    mistake = store.next_mistake("m")
    assert mistake is not None and mistake.equivalents == ("x1", "x2", "x3")


def test_policy_arguments_are_checked(store: Store) -> None:
    with pytest.raises(ValueError, match="quorum"):
        store.next_mistake("m", quorum=0)
    with pytest.raises(ValueError, match="conflict_share"):
        store.next_mistake("m", conflict_share=1.0)


def test_accepted_patch_marks_patched_and_replays_in_order(store: Store) -> None:
    first, second, third = claim(store, "one"), claim(store, "two"), claim(store, "three")
    store.add_patch(second, patch_in(b"n2"))
    rejected = store.add_patch(first, patch_in(b"bad", accepted=False, locality=0.9))
    store.add_patch(first, patch_in(b"n1", n_neurons=2))
    store.set_status(third, Status.GATE_REJECTED, note="3 tries failed")

    kept = store.accepted_patches("m")
    assert [(p.mistake_id, p.neurons) for p in kept] == [(second, b"n2"), (first, b"n1")]
    assert kept[1].gate == {"locality": 1.0} and kept[1].n_neurons == 2
    assert [p.id for p in store.patches_of(first)][0] == rejected
    counts = store.status_counts("m")
    assert counts[Status.PATCHED] == 2 and counts[Status.GATE_REJECTED] == 1


def test_verdicts_in_the_order_they_were_stored(store: Store) -> None:
    first, second, third = claim(store, "one"), claim(store, "two"), claim(store, "three")
    store.add_patch(second, patch_in(b"n2"))
    store.add_patch(third, patch_in(b"bad", accepted=False))
    assert store.recover_interrupted("m") == [first, third]  # a crash: neither is a verdict
    again = [store.next_mistake("m"), store.next_mistake("m")]
    assert [m.id for m in again if m is not None] == [first, third]
    store.set_status(third, Status.GATE_REJECTED, note="3 tries failed")
    store.set_status(first, Status.ALREADY_FIXED)
    claim(store, "other model", model="n")
    verdicts = [(second, Status.PATCHED), (third, Status.GATE_REJECTED), (first, Status.ALREADY_FIXED)]
    assert store.verdicts("m") == verdicts
    assert store.verdicts("n") == []


def test_patch_needs_a_claimed_mistake(store: Store) -> None:
    store.record_batch([report("e1", "x")])
    mistake = store.find_mistake("m", fingerprint("m", "x"))
    assert mistake is not None
    with pytest.raises(ValueError, match="not patching"):
        add_patch(store, mistake.id)
    assert store.accepted_patches("m") == []


def test_removed_patch_leaves_the_replay_and_revokes(store: Store) -> None:
    mid = claim(store, "x")
    pid = add_patch(store, mid)
    store.mark_patch_removed(pid, "operator: wrong correction")
    assert store.accepted_patches("m") == []
    assert store.get_mistake(mid).status == Status.REVOKED  # type: ignore[union-attr]
    assert store.patches_of(mid)[0].removed_reason == "operator: wrong correction"
    with pytest.raises(ValueError, match="removed"):
        store.mark_patch_removed(pid, "again")
    with pytest.raises(NotFound):
        store.mark_patch_removed(999_999, "none")


def test_recover_interrupted_requeues_patching(store: Store) -> None:
    interrupted, done = claim(store, "crashed mid-training"), claim(store, "finished")
    add_patch(store, done)
    assert store.recover_interrupted("m") == [interrupted]
    assert store.get_mistake(interrupted).status == Status.QUEUED  # type: ignore[union-attr]
    assert store.recover_interrupted("m") == []
    again = store.next_mistake("m")
    assert again is not None and again.id == interrupted


def test_illegal_status_change_raises_and_changes_nothing(store: Store) -> None:
    store.record_batch([report("e1", "x")])
    mid = store.find_mistake("m", fingerprint("m", "x")).id  # type: ignore[union-attr]
    with pytest.raises(IllegalTransition, match="reported -> patched"):
        store.set_status(mid, Status.PATCHED)
    assert store.get_mistake(mid).status == Status.REPORTED  # type: ignore[union-attr]
    with pytest.raises(NotFound):
        store.set_status(123_456, Status.QUEUED)


def test_versions(store: Store) -> None:
    assert store.latest_version("m") is None
    store.add_version("m", 1, None, "a" * 64, [3, 1])
    store.add_version("m", 2, 1, "b" * 64, [3, 1, 7], uri="file:///shared/m/versions/000002")
    store.add_version("other", 5, None, "c" * 64, [])
    latest = store.latest_version("m")
    assert latest is not None and (latest.number, latest.parent, latest.edit_ids) == (2, 1, (3, 1, 7))
    assert [v.number for v in store.versions("m")] == [1, 2]
    with pytest.raises(IntegrityError):
        store.add_version("m", 2, 1, "d" * 64, [])


def test_times_are_aware_utc(store: Store) -> None:
    store.record_batch([report("e1", "x")])
    mistake = store.find_mistake("m", fingerprint("m", "x"))
    assert mistake is not None and mistake.first_seen.tzinfo is not None
    assert abs(mistake.first_seen - datetime.now(UTC)) < timedelta(minutes=1)


def test_naive_datetimes_are_refused(store: Store) -> None:
    naive = ReportIn(**{**report("e1", "x").__dict__, "reported_at": datetime(2024, 1, 1)})
    with pytest.raises(Exception, match="naive datetime"):
        store.record_batch([naive])
    assert store.table_counts()["reports"] == 0


def test_open_without_upgrade_refuses_an_old_schema(db_url: str) -> None:
    with pytest.raises(SchemaOutOfDate, match="patchd db upgrade"):
        Store.open(db_url, upgrade=False)
    Store.open(db_url).close()
    Store.open(db_url, upgrade=False).close()
