"""S3 fixtures: one real S3-compatible server per test session (never a mock, never a skip).

The server is the one `deploy/s3/server.sh` runs in development (s3proxy over a local directory,
launched by daemon/tools/s3server.py on a free port with a private state directory). A server
that cannot start fails the tests that need it.

Fixtures:
  s3_server   (session) the S3ServerScript this session started (endpoint, credentials)
  s3_options  (test)    S3Options for it, with a private cache directory
  s3_root     (test)    "s3://patchd/<fresh prefix>": an empty place of its own in the bucket
  s3_storage  (test)    an S3Storage on s3_root
Tests that use s3_server (directly or through the others) get the `s3` marker.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.tools.s3server import BUCKET, S3ServerError, S3ServerScript
from patching.s3storage import S3Options, S3Storage


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3ServerScript]:
    server = S3ServerScript.on_free_port(tmp_path_factory.mktemp("s3-server"))
    try:
        server.start()
    except (S3ServerError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"the test S3 server did not start: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_options(s3_server: S3ServerScript, tmp_path: Path) -> S3Options:
    env = s3_server.env()
    return S3Options(
        endpoint_url=s3_server.endpoint,
        region=env["AWS_REGION"],
        access_key_id=env["AWS_ACCESS_KEY_ID"],
        secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        cache_dir=tmp_path / "s3-cache",
    )


@pytest.fixture
def s3_root() -> str:
    return f"s3://{BUCKET}/test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_storage(s3_root: str, s3_options: S3Options) -> S3Storage:
    return S3Storage(s3_root, s3_options)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "s3_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.s3)
