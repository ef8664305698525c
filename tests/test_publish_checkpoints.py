"""Publishing on every medium (a file system, the real S3 server): SIGKILL at every step, corrupted
bytes, retention, retention while a watcher reads, nothing to publish.

No Kafka here (the publisher runs without a release sender); the daemon and the downstream watcher
on a real broker are in test_publish_daemon.py.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from daemon.publisher import Publisher, publish_steps
from memory.store import Store
from patching.checkpoint import MANIFEST_FILE, CheckpointError, read_verified
from patching.client import CheckpointWatcher, NoGoodVersion, load_latest
from patching.loading import load_base_model
from patching.storage import Storage, StorageError, version_name
from tests.media import get_raw, put_raw, raw_names
from tests.publishing import MODEL, Zygote, add_patches, tiny_info
from tests.tinybase import tiny_base


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def store(tmp_path: Path):
    with Store.open(f"sqlite:///{tmp_path / 'patchd.db'}") as s:
        yield s


def _verified_latest(storage: Storage) -> int | None:
    pointer = storage.latest(MODEL)
    if pointer is not None:
        read_verified(storage, MODEL, pointer)
    return pointer


def test_sigkill_at_every_step_never_exposes_an_incomplete_version(base: Path, store: Store, storage: Storage) -> None:
    steps = publish_steps(storage)
    add_patches(store, 3, hidden=64)
    first = Publisher(MODEL, store, storage, tiny_info(base)).publish_if_changed()
    assert first is not None and storage.latest(MODEL) == first.number == 1

    # a reader polls the whole time, as a downstream service would: LATEST must always verify
    failures: list[str] = []
    reads = 0
    stop = threading.Event()

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                _verified_latest(storage)
                for number in storage.versions(MODEL):  # whatever is listed is complete
                    read_verified(storage, MODEL, number)
                reads += 1
            except (CheckpointError, OSError) as exc:
                failures.append(repr(exc))
            time.sleep(0.02)  # leave the CPU to the publisher (two cores on the CI machine)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    zygote = Zygote(store.engine.url.render_as_string(hide_password=False), storage, tiny_info(base))
    released = {1}  # versions LATEST named at some point: exactly these get a row
    try:
        flipped = steps.index(storage.latest_step)
        for i, step in enumerate(steps):
            add_patches(store, 1, hidden=64, seed=i + 1)  # something new to publish each time
            before = storage.latest(MODEL)
            assert zygote.publish(kill_at=step) == -9, f"the publisher was not killed at {step}"
            after = _verified_latest(storage)
            assert after is not None
            if i < flipped:
                assert after == before, f"killed at {step}: LATEST moved before its version was complete"
            else:
                assert after > before, f"killed at {step}: LATEST did not name the new version"
                released.add(after)
            for number in storage.versions(MODEL):
                read_verified(storage, MODEL, number)  # no half version under a version number
        assert zygote.publish(kill_at=None) == 0  # a clean publish after all the crashes
        latest = _verified_latest(storage)
        assert latest is not None
        released.add(latest)
        assert zygote.publish(kill_at=None) == 0  # nothing changed: nothing is published
        assert storage.latest(MODEL) == latest == max(storage.versions(MODEL))
    finally:
        zygote.close()
        stop.set()
        thread.join()
    assert failures == [] and reads > 0

    # recovery: leftovers are gone, every released version is recorded (and no other), the last is complete
    # (file system: no temp or trash entry; S3: no key outside a committed version, since a publish
    # that died is overwritten by the next one of that number)
    committed = {version_name(n) for n in storage.versions(MODEL)}
    assert [n for n in raw_names(storage, f"{MODEL}/versions") if n.split("/")[0] not in committed] == []
    assert [n for n in raw_names(storage, MODEL) if n.startswith(".LATEST")] == []
    recorded = {v.number for v in store.versions(MODEL)}
    assert recorded == released
    final = read_verified(storage, MODEL, latest)
    assert final.patch_ids == [p.id for p in store.accepted_patches(MODEL)]
    assert final.manifest["neurons"] == 3 + len(steps)
    # segments the killed publishes wrote but no version lists go with retention, the rest stay
    listed = {name for n in storage.versions(MODEL) for name in read_verified(storage, MODEL, n).segments}
    assert listed <= set(storage.segments(MODEL))
    Publisher(MODEL, store, storage, tiny_info(base), grace_s=0).prune()
    assert set(storage.segments(MODEL)) == {
        name for n in storage.versions(MODEL) for name in read_verified(storage, MODEL, n).segments
    }


def _publish_two(store: Store, storage: Storage, base: Path) -> Publisher:
    publisher = Publisher(MODEL, store, storage, tiny_info(base))
    add_patches(store, 2, hidden=64, seed=10)
    publisher.publish_if_changed()
    add_patches(store, 2, hidden=64, seed=11)
    publisher.publish_if_changed()
    assert storage.versions(MODEL) == [1, 2] and storage.latest(MODEL) == 2
    return publisher


@pytest.mark.parametrize("name", ["segment", MANIFEST_FILE])
def test_flipped_byte_is_detected_and_the_loader_falls_back(
    base: Path, store: Store, storage: Storage, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    _publish_two(store, storage, base)
    if name == "segment":  # version 2's own segment (its tail holds 4 patches, version 1's 2)
        (segment,) = set(read_verified(storage, MODEL, 2).segments) - set(read_verified(storage, MODEL, 1).segments)
        path = f"{MODEL}/segments/{segment}"
        forget_segments(storage)
    else:
        path = f"{MODEL}/versions/{version_name(2)}/{name}"
    data = bytearray(get_raw(storage, path))
    data[len(data) // 2] ^= 0x01  # one bit, in the middle of the file
    put_raw(storage, path, bytes(data))
    with pytest.raises(CheckpointError):
        read_verified(storage, MODEL, 2)

    with caplog.at_level(logging.WARNING, logger="patching.client"):
        loaded = load_latest(storage, MODEL, base)
    assert loaded.version == 1
    assert "refused version 2" in caplog.text and "serving version 1" in caplog.text
    # the fallback is exactly version 1: same neurons as its files say
    from patching.arch import locate
    from patching.layer import patched

    wrapper = patched(locate(loaded.model))
    assert wrapper is not None and wrapper.n == 2
    v1 = read_verified(storage, MODEL, 1)
    assert wrapper.edit_ids == v1.config.edit_ids


def test_wrong_base_or_bad_latest_falls_back_and_nothing_good_raises(
    base: Path, store: Store, storage: Storage
) -> None:
    from dataclasses import replace

    publisher = _publish_two(store, storage, base)
    # version 3 made for another base: refused by identity, version 2 served
    publisher.base = replace(publisher.base, identity="0" * 64)
    add_patches(store, 1, hidden=64, seed=12)
    publisher.publish_if_changed()
    assert load_latest(storage, MODEL, base).version == 2
    # an unreadable LATEST: the newest good version overall
    put_raw(storage, f"{MODEL}/LATEST", b"garbage\n")
    with pytest.raises(StorageError):
        storage.latest(MODEL)
    assert load_latest(storage, MODEL, base).version == 2
    # LATEST names a version that is not there (deleted, or not visible yet to this NFS client)
    put_raw(storage, f"{MODEL}/LATEST", b"7\n")
    assert load_latest(storage, MODEL, base).version == 2
    # nothing servable at all
    put_raw(storage, f"{MODEL}/LATEST", b"3\n")
    for number in (1, 2):
        for segment in read_verified(storage, MODEL, number).segments:
            put_raw(storage, f"{MODEL}/segments/{segment}", b"x")
    forget_segments(storage)  # S3: a verified copy in the local cache would still be served
    with pytest.raises(NoGoodVersion):
        load_latest(storage, MODEL, base)


def test_retention_keeps_the_newest_and_never_latest(base: Path, store: Store, storage: Storage) -> None:
    publisher = Publisher(MODEL, store, storage, tiny_info(base), keep=2, grace_s=0)
    for i in range(6):
        add_patches(store, 1, hidden=64, seed=20 + i)
        publisher.publish_if_changed()
    assert storage.versions(MODEL) == [1, 2, 3, 4, 5, 6]
    storage.set_latest(MODEL, 2)  # an operator pointed LATEST back by hand
    assert publisher.prune() == [1, 3, 4]  # oldest first; 2 is LATEST's, 5 and 6 the newest two
    assert storage.versions(MODEL) == [2, 5, 6]
    read_verified(storage, MODEL, 2)
    # within the grace period nothing that was recently the newest goes
    storage.set_latest(MODEL, 6)
    publisher.grace_s = 3600
    assert publisher.prune() == []
    publisher.grace_s = 0
    assert publisher.prune() == [2]
    assert storage.versions(MODEL) == [5, 6] and storage.latest(MODEL) == 6


def test_watcher_swaps_between_requests(base: Path, store: Store, storage: Storage, tmp_path: Path) -> None:
    publisher = Publisher(MODEL, store, storage, tiny_info(base))
    swaps: list[int | None] = []
    watcher = CheckpointWatcher(storage, MODEL, base, interval=0.05, on_swap=lambda v: swaps.append(v.version))
    assert watcher.version is None  # nothing published: the base
    ids = torch.tensor([[2, 5, 9, 11]])
    base_logits = load_base_model(base)(input_ids=ids).logits
    with watcher:
        held = watcher.model  # a request in flight keeps its model through a swap
        add_patches(store, 2, hidden=64, seed=30)
        published = publisher.publish_if_changed()
        assert published is not None
        deadline = time.monotonic() + 10
        # on_swap runs just after the swap is visible: wait for both
        while (watcher.version != published.number or not swaps) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert watcher.version == published.number and swaps == [published.number]
        assert torch.equal(held(input_ids=ids).logits, base_logits)
        from patching.loading import load_patched

        version_dir = download(storage, published.number, tmp_path / "download")
        expected = load_patched(base, version_dir)(input_ids=ids).logits
        assert torch.allclose(watcher.model(input_ids=ids).logits, expected)
    assert os.environ.get("PATCHD_FAULT_KILL_AT") is None


def download(storage: Storage, number: int, out: Path) -> Path:
    """A version's verified files in a local directory (what load_patched reads)."""
    from patching.client import local_files

    out.mkdir(parents=True, exist_ok=True)
    for name, data in local_files(read_verified(storage, MODEL, number)):
        (out / name).write_bytes(data)
    return out


def forget_segments(storage: Storage) -> None:
    """Drop local copies of segments (S3's cache): the next read goes to the server."""
    import shutil

    cache = getattr(storage, "cache", None)
    if cache is not None:
        shutil.rmtree(cache / MODEL / "segments", ignore_errors=True)
