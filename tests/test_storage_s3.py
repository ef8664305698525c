"""What only the object store has, on the real S3 server: conditional polls, the local cache,
retention racing a reader, and start-up errors that name the setting.

The medium-neutral contract (SIGKILL at every step, flipped bytes, fallbacks, retention, the
watcher) runs on S3 too, in test_publish_checkpoints.py; the daemon on S3 in test_publish_daemon.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from daemon import cli
from daemon.publisher import Publisher
from daemon.tools.s3server import S3ServerScript
from memory.store import Store
from patching.arch import locate
from patching.checkpoint import read_verified
from patching.client import CheckpointWatcher, load_latest
from patching.layer import patched
from patching.s3storage import S3Options, S3Storage
from patching.storage import version_name
from tests.media import put_raw, raw_names
from tests.publishing import MODEL, add_patches, tiny_info
from tests.tinybase import tiny_base, write_config


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def store(tmp_path: Path):
    with Store.open(f"sqlite:///{tmp_path / 'patchd.db'}") as s:
        yield s


def _reader(root: str, options: S3Options, cache: Path) -> S3Storage:
    """A downstream service's own client: its own connection pool, ETags and cache directory."""
    from dataclasses import replace

    return S3Storage(root, replace(options, cache_dir=cache))


def _served_edits(model: object) -> list[str]:
    wrapper = patched(locate(model))
    return list(wrapper.edit_ids) if wrapper is not None else []


def test_an_idle_watcher_sends_one_conditional_get_per_poll(
    base: Path, store: Store, s3_storage: S3Storage, s3_root: str, s3_options: S3Options, tmp_path: Path
) -> None:
    publisher = Publisher(MODEL, store, s3_storage, tiny_info(base))
    add_patches(store, 2, hidden=64)
    first = publisher.publish_if_changed()
    assert first is not None
    reader = _reader(s3_root, s3_options, tmp_path / "reader-cache")
    watcher = CheckpointWatcher(reader, MODEL, base, interval=0.05)
    assert watcher.version == first.number
    with watcher:
        reader.requests.clear()
        time.sleep(1.0)  # idle: LATEST does not move
        idle = dict(reader.requests)
        # the poll is the only request, and it is the conditional GET of LATEST (answered 304)
        assert set(idle) == {"GetObject"} and 5 <= idle["GetObject"] <= 25, idle
        add_patches(store, 1, hidden=64, seed=1)
        second = publisher.publish_if_changed()
        assert second is not None
        deadline = time.monotonic() + 10
        while watcher.version != second.number and time.monotonic() < deadline:
            time.sleep(0.02)
    assert watcher.version == second.number  # a changed ETag is seen at the next poll
    assert _served_edits(watcher.model) == read_verified(s3_storage, MODEL, second.number).config.edit_ids


def test_the_cache_serves_verified_copies_and_a_corrupt_copy_is_fetched_again(
    base: Path, store: Store, s3_storage: S3Storage, s3_root: str, s3_options: S3Options, tmp_path: Path
) -> None:
    publisher = Publisher(MODEL, store, s3_storage, tiny_info(base))
    add_patches(store, 3, hidden=64)
    published = publisher.publish_if_changed()
    assert published is not None
    cache = tmp_path / "service-cache"
    first = load_latest(_reader(s3_root, s3_options, cache), MODEL, base)
    (segments,) = [d for d in cache.rglob("segments") if d.parent.name == MODEL]  # <cache>/<bucket>/<prefix>/<model>
    cached = list(segments.iterdir())
    assert first.version == published.number and [c.name for c in cached] == list(
        read_verified(s3_storage, MODEL, published.number).segments
    )

    # a restarted service reads LATEST and the manifest again, the segment from its cache
    again = _reader(s3_root, s3_options, cache)
    assert load_latest(again, MODEL, base).version == published.number
    assert again.requests["GetObject"] == 2  # LATEST and manifest.json; the segment from the cache

    # a flipped bit in the cached copy: refetched, and the same version is served (no fallback)
    data = bytearray(cached[0].read_bytes())
    data[len(data) // 2] ^= 0x01
    cached[0].write_bytes(bytes(data))
    third = _reader(s3_root, s3_options, cache)
    watcher = CheckpointWatcher(third, MODEL, base, interval=3600)
    # LATEST (then a conditional GET of it again while choosing the version), manifest, the segment again
    assert watcher.version == published.number and third.requests["GetObject"] == 4
    assert cached[0].read_bytes() == read_verified(s3_storage, MODEL, published.number).segments[cached[0].name]
    assert _served_edits(watcher.model) == _served_edits(first.model)

    # a new version: the watcher fetches its new segment only, and its cache keeps just what it serves
    add_patches(store, 1, hidden=64, seed=7)
    newer = publisher.publish_if_changed()
    assert newer is not None
    before = third.requests["GetObject"]
    assert watcher.check() and watcher.version == newer.number
    assert third.requests["GetObject"] - before == 4  # LATEST twice, manifest.json, the new tail segment only
    assert {c.name for c in segments.iterdir()} == set(read_verified(s3_storage, MODEL, newer.number).segments)


def test_a_version_deleted_while_read_falls_back_and_is_never_mixed(
    base: Path, store: Store, s3_storage: S3Storage, s3_root: str, s3_options: S3Options, tmp_path: Path
) -> None:
    publisher = Publisher(MODEL, store, s3_storage, tiny_info(base), keep=1, grace_s=0)
    add_patches(store, 2, hidden=64, seed=1)
    v1 = publisher.publish_if_changed()
    add_patches(store, 2, hidden=64, seed=2)
    v2 = publisher.publish_if_changed()
    assert v1 is not None and v2 is not None

    own = set(read_verified(s3_storage, MODEL, v2.number).segments) - set(
        read_verified(s3_storage, MODEL, v1.number).segments
    )

    class Racing(S3Storage):
        """Retention deletes version 2 and its own segments between the reader's manifest and them."""

        def read(self, model: str, number: int, name: str) -> bytes:
            data = super().read(model, number, name)
            if number == v2.number and name == "manifest.json":
                s3_storage.delete_version(MODEL, v2.number)
                for segment in own:
                    s3_storage.delete_segment(MODEL, segment)
            return data

    reader = Racing(s3_root, s3_options)
    loaded = load_latest(reader, MODEL, base)
    # v2's files were gone (NoSuchKey -> VersionMissing): the previous good version, whole
    assert loaded.version == v1.number
    assert _served_edits(loaded.model) == read_verified(s3_storage, MODEL, v1.number).config.edit_ids


def test_retention_running_while_a_watcher_reads_never_serves_a_mixed_version(
    base: Path, store: Store, s3_storage: S3Storage, s3_root: str, s3_options: S3Options, tmp_path: Path
) -> None:
    # keep=1, no grace: every publish deletes the version before it, as fast as it can
    publisher = Publisher(MODEL, store, s3_storage, tiny_info(base), keep=1, grace_s=0)
    edits_of: dict[int, list[str]] = {}
    served: list[tuple[int | None, list[str]]] = []
    reader = _reader(s3_root, s3_options, tmp_path / "reader-cache")
    watcher = CheckpointWatcher(
        reader, MODEL, base, interval=0.01, on_swap=lambda v: served.append((v.version, _served_edits(v.model)))
    )
    stop = threading.Event()

    def churn() -> None:
        for i in range(15):
            add_patches(store, 1, hidden=64, seed=100 + i)
            published = publisher.publish_if_changed()
            assert published is not None
            edits_of[published.number] = [str(e) for e in published.edits]
            publisher.prune()
        stop.set()

    with watcher:
        thread = threading.Thread(target=churn)
        thread.start()
        thread.join(timeout=120)
        assert stop.is_set()
        deadline = time.monotonic() + 10
        while watcher.version != max(edits_of) and time.monotonic() < deadline:
            time.sleep(0.02)
    assert served, "the watcher never swapped: the race was not exercised"
    for version, edits in served:
        assert version is not None and edits == edits_of[version], f"version {version} served a mix"
    assert watcher.version == max(edits_of)
    assert s3_storage.versions(MODEL) == [max(edits_of)]
    assert [
        n for n in raw_names(s3_storage, f"{MODEL}/versions") if not n.startswith(version_name(max(edits_of)))
    ] == []


@pytest.mark.parametrize(
    ("change", "setting", "words"),
    [
        ({"PATCHD_STORAGE_SECRET_ACCESS_KEY": "wrong-secret"}, "storage.access_key_id", "denied"),
        ({"PATCHD_STORAGE_ROOT": "s3://no-such-bucket/x"}, "storage.root", "does not exist"),
        ({"PATCHD_STORAGE_ENDPOINT_URL": "http://127.0.0.1:9"}, "storage.endpoint_url", "cannot reach"),
    ],
)
def test_bad_credentials_or_a_missing_bucket_stop_start_up_naming_the_setting(
    tmp_path: Path,
    s3_server: S3ServerScript,
    s3_root: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str],
    setting: str,
    words: str,
) -> None:
    # the broker and the model are never reached: the storage check comes first
    config = write_config(
        tmp_path / "patchd.toml",
        base=tmp_path / "no-base",
        data=tmp_path,
        bootstrap="127.0.0.1:1",
        topic="t",
        state=tmp_path / "state",
    )
    env = {"PATCHD_STORAGE_ROOT": s3_root, **s3_server.settings_env(), **change}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    t0 = time.monotonic()
    assert cli.main(["run", "--once", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert setting in err and words in err, err
    assert env["PATCHD_STORAGE_SECRET_ACCESS_KEY"] not in err  # the secret is never printed
    assert time.monotonic() - t0 < 60


def test_a_good_bucket_passes_the_check_and_an_empty_prefix_lists_nothing(s3_storage: S3Storage) -> None:
    s3_storage.check()
    assert s3_storage.versions(MODEL) == [] and s3_storage.latest(MODEL) is None
    put_raw(s3_storage, f"{MODEL}/versions/{version_name(4)}/patches.safetensors", b"half a format-1 publish")
    assert s3_storage.versions(MODEL) == []  # no manifest: not a version
    assert s3_storage.cleanup(MODEL) == []  # too recent: its publisher may still be writing
    assert s3_storage.cleanup(MODEL, stale_s=0) == [version_name(4)]
    assert raw_names(s3_storage, f"{MODEL}/versions") == []


def test_the_standard_aws_variables_are_enough(
    s3_server: S3ServerScript, s3_root: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from patching.storage_uri import open_storage

    for key, value in s3_server.env().items():  # AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATCHD_CACHE_DIR", str(tmp_path))
    storage = open_storage(s3_root)  # a downstream service's one-liner: no options at all
    assert isinstance(storage, S3Storage) and storage.endpoint_url == s3_server.endpoint
    storage.check()
    storage.set_latest(MODEL, 3)
    assert storage.latest(MODEL) == 3
