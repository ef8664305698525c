"""`patchd db copy`: SQLite -> real PostgreSQL, every row kept, ids kept, new rows do not collide."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import cli
from memory.fingerprint import fingerprint
from memory.lifecycle import Status
from memory.records import RejectedIn
from memory.store import Store
from tests.test_memory_store import claim, patch_in, report


@pytest.mark.postgres
def test_copy_sqlite_to_postgres_keeps_everything(
    tmp_path: Path, pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = f"sqlite:///{tmp_path}/patchd.db"
    with Store.open(source) as store:
        first = claim(store, "water is dry")
        kept = store.add_patch(first, patch_in(neurons=b"neuron-1"))
        second = claim(store, "fire is cold")
        store.add_patch(second, patch_in(neurons=b"rejected", accepted=False))
        store.set_status(second, Status.GATE_REJECTED, note="locality")
        store.record_batch([report("e1", "sky is green"), report("e2", "sky is green", reporter="bob")])
        store.add_version("m", 1, None, "ab" * 32, [first])
        store.record_rejected([RejectedIn(b"{", "bad_json", "x", "corrections", 0, 99)])
        counts = store.table_counts()
        statuses = store.status_counts("m")

    assert cli.main(["db", "copy", "--from", source, "--to", pg_database]) == 0
    out = capsys.readouterr().out
    assert "copied sqlite" in out

    with Store.open(pg_database, upgrade=False) as copied:
        assert copied.table_counts() == counts
        assert copied.status_counts("m") == statuses
        patches = copied.accepted_patches("m")
        assert [(p.id, p.mistake_id, p.neurons) for p in patches] == [(kept, first, b"neuron-1")]
        assert copied.latest_version("m").edit_ids == (first,)
        # the sequences moved past the copied ids: new rows get new ids
        copied.record_batch([report("e3", "ice is hot")])
        assert copied.find_mistake("m", fingerprint("m", "ice is hot")).id > second
        sky = copied.next_mistake("m")
        assert sky is not None and sky.input_text == "sky is green"
        assert copied.add_patch(sky.id, patch_in()) > kept

    # a second copy would mix two histories: refused, and the target is untouched
    assert cli.main(["db", "copy", "--from", source, "--to", pg_database]) == 1
    assert "already has" in capsys.readouterr().err
