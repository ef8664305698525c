"""The publishing tests on every storage medium: one fixture, and raw access below the Storage API.

`medium` is parametrised "file" / "s3", so a test that takes `storage` runs on a file system and
on the real S3 server. Tests corrupt and inspect what lies on the medium through `put_raw` /
`get_raw` / `raw_names` (paths relative to the root: "tiny/versions/000002/manifest.json"),
which bypass the Storage class under test.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from patching.s3storage import S3Storage
from patching.storage import FileStorage, Storage


@pytest.fixture(params=["file", "s3"])
def medium(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def storage(medium: str, tmp_path: Path, request: pytest.FixtureRequest) -> Storage:
    if medium == "file":
        return FileStorage(tmp_path / "checkpoints")
    s3: S3Storage = request.getfixturevalue("s3_storage")
    return s3


def put_raw(storage: Storage, relative: str, data: bytes) -> None:
    if isinstance(storage, FileStorage):
        (storage.root / relative).parent.mkdir(parents=True, exist_ok=True)
        (storage.root / relative).write_bytes(data)
    else:
        assert isinstance(storage, S3Storage)
        storage.client.put_object(Bucket=storage.bucket, Key=f"{storage.prefix}/{relative}", Body=data)


def get_raw(storage: Storage, relative: str) -> bytes:
    if isinstance(storage, FileStorage):
        return (storage.root / relative).read_bytes()
    assert isinstance(storage, S3Storage)
    return bytes(storage.client.get_object(Bucket=storage.bucket, Key=f"{storage.prefix}/{relative}")["Body"].read())


def raw_names(storage: Storage, relative: str) -> list[str]:
    """Every entry (file system: the directory's entries; S3: keys below the prefix, relative)."""
    if isinstance(storage, FileStorage):
        directory = storage.root / relative
        return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    assert isinstance(storage, S3Storage)
    prefix = f"{storage.prefix}/{relative}/"
    pages = storage.client.get_paginator("list_objects_v2").paginate(Bucket=storage.bucket, Prefix=prefix)
    return sorted(obj["Key"][len(prefix) :] for page in pages for obj in page.get("Contents", []))


def storage_spec(storage: Storage) -> dict[str, Any]:
    """What a child process needs to open the same storage (tests/publish_child.py)."""
    if isinstance(storage, S3Storage):
        options = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(storage.options).items()}
        return {"root": storage.uri, "s3": options}
    assert isinstance(storage, FileStorage)
    return {"root": str(storage.root), "s3": None}


def open_spec(spec: dict[str, Any]) -> Storage:
    from patching.s3storage import S3Options
    from patching.storage_uri import open_storage

    options = spec.get("s3")
    if not options:
        return open_storage(spec["root"])
    return open_storage(spec["root"], S3Options(**{**options, "cache_dir": Path(options["cache_dir"])}))
