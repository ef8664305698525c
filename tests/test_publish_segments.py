"""Versions share segments (checkpoint format 2), on every medium: a publish that adds a patch
writes only a small segment and a manifest, a watcher that serves the parent reads only the new
segments, retention keeps every segment a kept version lists, and format-1 versions stay readable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.publisher import Publisher, segment_plan
from memory.store import Store
from patching.checkpoint import FORMAT_1, MANIFEST_FILE, encode_manifest, file_entry, read_verified
from patching.client import CheckpointWatcher, load_latest, local_files
from patching.patchfile import CONFIG_FILE, PATCHES_FILE
from patching.storage import Storage
from tests.media import raw_names
from tests.publishing import MODEL, add_patches, tiny_info
from tests.tinybase import tiny_base


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def store(tmp_path: Path):
    with Store.open(f"sqlite:///{tmp_path / 'patchd.db'}") as s:
        yield s


def test_the_segment_plan_is_aligned_blocks_then_a_tail() -> None:
    assert segment_plan(0) == [] and segment_plan(5) == [(0, 5)] and segment_plan(16) == [(0, 16)]
    assert segment_plan(33) == [(0, 16), (16, 32), (32, 33)]
    plan = segment_plan(10_000)
    assert plan[:2] == [(0, 4096), (4096, 8192)] and len(plan) == 10 and plan[-1] == (9984, 10_000)
    for n in range(1, 700):  # contiguous, complete, and one more patch never moves a full block
        ranges = segment_plan(n)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        blocks = [r for r in ranges if r[1] - r[0] >= 16]
        assert all(r in segment_plan(n + 1) or (r[1] - r[0]) * 16 <= n + 1 for r in blocks)


def test_one_more_patch_writes_one_small_segment_and_a_watcher_reads_only_it(
    base: Path, store: Store, storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher = Publisher(MODEL, store, storage, tiny_info(base))
    add_patches(store, 40, hidden=64, seed=1)  # 2 blocks of 16, a tail of 8
    first = publisher.publish_if_changed()
    assert first is not None and len(read_verified(storage, MODEL, first.number).segments) == 3
    watcher = CheckpointWatcher(storage, MODEL, base, interval=3600)
    assert watcher.version == first.number

    read: list[str] = []
    real = storage.read_segment

    def counted(model: str, name: str) -> bytes:
        read.append(name)
        return real(model, name)

    monkeypatch.setattr(storage, "read_segment", counted)
    fetched: list[list[int]] = []  # the publisher reads neuron bytes of the new segment's patches only
    by_id = store.patches_by_id
    monkeypatch.setattr(store, "patches_by_id", lambda ids: fetched.append(list(ids)) or by_id(ids))
    add_patches(store, 1, hidden=64, seed=2)
    second = publisher.publish_if_changed()
    assert second is not None
    assert fetched == [[p.id for p in store.accepted_patches(MODEL)][32:]]  # the tail: patches 33 to 41
    v1, v2 = read_verified(storage, MODEL, first.number), read_verified(storage, MODEL, second.number)
    new = [name for name in v2.segments if name not in v1.segments]
    assert len(new) == 1 and list(v2.segments)[:2] == list(v1.segments)[:2]  # the blocks are shared
    assert second.written == len(v2.segments[new[0]]) + v2.manifest_size < second.size
    read.clear()
    assert watcher.check() and watcher.version == second.number
    assert read == new  # the parent's segments came from the watcher's own copy
    assert watcher.current().edits == tuple(v2.edits) and v2.patch_ids == [p.id for p in store.accepted_patches(MODEL)]


def test_retention_keeps_every_segment_a_kept_version_lists(base: Path, store: Store, storage: Storage) -> None:
    publisher = Publisher(MODEL, store, storage, tiny_info(base), keep=1, grace_s=0)
    numbers = []
    for count in (16, 1, 1):  # a block, then two tails beside it
        add_patches(store, count, hidden=64, seed=count + len(numbers))
        published = publisher.publish_if_changed()
        assert published is not None
        numbers.append(published.number)
    block = next(iter(read_verified(storage, MODEL, numbers[0]).segments))
    assert all(block in read_verified(storage, MODEL, n).segments for n in numbers)
    assert publisher.prune() == numbers[:2]
    kept = read_verified(storage, MODEL, numbers[2])  # whole: its shared block was not touched
    assert set(storage.segments(MODEL)) == set(kept.segments) and block in kept.segments
    assert load_latest(storage, MODEL, base).version == numbers[2]
    # within the grace period even an unlisted segment stays (its publish may be in flight)
    publisher.grace_s = 3600
    storage.put_segment(MODEL, "0" * 64 + ".safetensors", b"in flight")
    publisher.prune()
    assert "0" * 64 + ".safetensors" in storage.segments(MODEL)


def test_a_format_1_version_is_still_served_and_the_next_publish_builds_on_it(
    base: Path, store: Store, storage: Storage, tmp_path: Path
) -> None:
    # a version as publishers before segments wrote it: files in the version, edits in the manifest
    add_patches(store, 3, hidden=64, seed=5)
    first = Publisher(MODEL, store, storage, tiny_info(base)).publish_if_changed()
    assert first is not None
    v2 = read_verified(storage, MODEL, first.number)
    files = dict(local_files(v2))  # the same neurons as the two files of format 1
    body = {
        "format": FORMAT_1,
        "model": MODEL,
        "version": 7,
        "parent": None,
        "created_at": "2026-01-01T00:00:00+00:00",
        "code_version": "0.1.0",
        "base": v2.manifest["base"],
        "neurons": 3,
        "edits": v2.edits,
        "patch_ids": v2.patch_ids,
        "added": v2.edits,
        "removed": [],
        "reason": "patched",
        "gate": {},
        "files": {PATCHES_FILE: file_entry(files[PATCHES_FILE]), CONFIG_FILE: file_entry(files[CONFIG_FILE])},
    }
    storage.put_version(
        MODEL,
        7,
        [
            (PATCHES_FILE, files[PATCHES_FILE]),
            (CONFIG_FILE, files[CONFIG_FILE]),
            (MANIFEST_FILE, encode_manifest(body)),
        ],
    )
    storage.set_latest(MODEL, 7)
    old = read_verified(storage, MODEL, 7)
    assert not old.segmented and old.edits == v2.edits and old.patch_ids == v2.patch_ids
    assert load_latest(storage, MODEL, base).version == 7
    # a new publisher on top of it: its parent holds no segments, so it writes them all
    add_patches(store, 1, hidden=64, seed=6)
    publisher = Publisher(MODEL, store, storage, tiny_info(base), keep=1, grace_s=0)
    nxt = publisher.publish_if_changed()
    assert nxt is not None and nxt.parent == 7 and nxt.number == 8
    v8 = read_verified(storage, MODEL, 8)
    assert v8.segmented and v8.manifest["added"] == [v8.edits[-1]] and v8.manifest["removed"] == []
    assert json.loads(json.dumps(v8.config.edit_ids)) == old.config.edit_ids + [str(v8.edits[-1])]
    publisher.prune()  # a format-1 version lists no segments: the sweep copes
    assert storage.versions(MODEL) == [8] and load_latest(storage, MODEL, base).version == 8
    assert not [n for n in raw_names(storage, f"{MODEL}/versions") if n.startswith("000007")]
