"""Published checkpoints on an object store that speaks the S3 API (AWS S3, MinIO, Ceph RGW, s3proxy...).

    storage = S3Storage("s3://bucket/prefix", S3Options(endpoint_url="http://127.0.0.1:9000"))

The same layout as on a file system (patching/storage.py), as object keys:
    <prefix>/<model>/versions/000042/manifest.json   (format 1 also patches.safetensors, patch_config.json)
    <prefix>/<model>/segments/<sha256>.safetensors   content-addressed, shared by versions
    <prefix>/<model>/LATEST                                  "42\\n"

S3 has no rename, so "all at once" comes from the order of single-object PUTs, each of which is
atomic, and from S3's strong read-after-write consistency (AWS since December 2020; MinIO, Ceph
and s3proxy always):
- a version's files first, its manifest last: a prefix without a manifest is not a version to any
  reader (`versions` lists manifests only), whatever else it holds;
- LATEST last of all, replaced by one PUT: a reader gets the old or the new number, never a mix;
- deleting removes the manifest first (the version is gone for new readers), then the files; a
  reader that already read the manifest gets NoSuchKey for a file (FileNotFoundError ->
  VersionMissing) and falls back to an older version: checksums make a mixed read impossible.
One publisher per model writes (the daemon's model lock); a publish that died leaves files
without a manifest, which the next publish of that number overwrites or `cleanup` removes.

Reading is cheap when idle: `latest` sends a conditional GET (If-None-Match with the last ETag),
so an unchanged LATEST costs one small request answered 304 with no body. Version files are kept
in a local cache directory under the manifest's ETag (a version deleted and made again under the
same number gets a new ETag); patching/checkpoint.py verifies every byte of what is read, cached
or not, and calls `forget` to refetch once when a cached copy fails.

Why boto3 (weighed against obstore): it is the AWS SDK itself, the client every operator already
knows how to configure (AWS_* variables, ~/.aws, instance roles, SSO), with conditional requests,
paginators and standard retries; obstore is faster for bulk transfers, which this workload (a few
small objects a minute) does not need, and it is younger.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patching.storage import (
    _SEGMENT_NAME,
    LATEST_FILE,
    SEGMENTS_DIR,
    STALE_S,
    VERSIONS_DIR,
    Step,
    Storage,
    StorageError,
    StorageSetupError,
    VersionExists,
    _no_step,
    version_name,
)

_URI = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?")
_VERSION_KEY = re.compile(r"(\d{6,})/(.+)")
MANIFEST = "manifest.json"  # the commit marker (patching/checkpoint.py writes it; named here to list by it)
# a cached file's name while it is written: never read as a cached copy
_PARTIAL = ".partial-"


@dataclass(frozen=True)
class S3Options:
    """How to reach the store; every None falls back to the AWS SDK's own configuration chain."""

    # None: AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL, else AWS itself
    endpoint_url: str | None = None
    # None: AWS_REGION / AWS_DEFAULT_REGION / ~/.aws/config (S3's global endpoint works without one)
    region: str | None = None
    # None: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, an instance or pod role
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    # where fetched version files are kept; None: $PATCHD_CACHE_DIR/s3 or ~/.cache/patchd/s3
    cache_dir: Path | None = None


def _cache_root(options: S3Options) -> Path:
    if options.cache_dir is not None:
        return Path(options.cache_dir).expanduser()
    base = os.environ.get("PATCHD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "patchd"
    )
    return Path(base) / "s3"


class S3Storage(Storage):
    """Storage on an S3 bucket under a key prefix (module docstring)."""

    def __init__(self, uri: str, options: S3Options | None = None):
        import boto3  # lazy: a file-system deployment never imports the AWS SDK
        from botocore.config import Config

        match = _URI.fullmatch(uri.rstrip("/"))
        if not match:
            raise StorageSetupError("root", f"{uri!r} is not s3://BUCKET[/PREFIX] with a valid bucket name")
        self.bucket = match.group(1)
        self.prefix = (match.group(2) or "").strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.options = options or S3Options()
        self.endpoint_url = (
            self.options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        )
        config = Config(
            # a custom endpoint (an IP, a host of one's own) has no bucket subdomains: path-style URLs
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
            retries={"mode": "standard", "max_attempts": 4},
            connect_timeout=5,
            read_timeout=30,
            # the SDK's default CRC checksum headers are not understood by every S3-compatible server;
            # every byte is verified against the manifest's sha256 anyway
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session()
        self.client: Any = session.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.options.region,
            aws_access_key_id=self.options.access_key_id,
            aws_secret_access_key=self.options.secret_access_key,
            config=config,
        )
        # requests sent, by operation: what an idle watcher costs is measured, not guessed
        self.requests: Counter[str] = Counter()
        self.client.meta.events.register("before-send.s3", self._count)
        self.cache = _cache_root(self.options) / self.bucket / (self.prefix or "_")
        self._lock = threading.Lock()
        self._latest: dict[str, tuple[str, int]] = {}  # model -> (LATEST's ETag, its number)
        self._manifest_etag: dict[tuple[str, int], str] = {}
        self._conditional_put = True  # until the server answers 501 to If-None-Match on a PUT

    def _count(self, event_name: str = "", **_: Any) -> None:
        self.requests[event_name.rsplit(".", 1)[-1]] += 1

    # ------------------------------------------------------------------ keys

    def _model_key(self, model: str) -> str:
        if not model or "/" in model or model.startswith("."):
            raise StorageError(f"model name {model!r} cannot be a key segment")
        return f"{self.prefix}/{model}" if self.prefix else model

    def _versions_prefix(self, model: str) -> str:
        return f"{self._model_key(model)}/{VERSIONS_DIR}/"

    def _version_key(self, model: str, number: int, name: str = "") -> str:
        return f"{self._versions_prefix(model)}{version_name(number)}/{name}"

    # ------------------------------------------------------------------ the contract

    def write_steps(self, files: Sequence[str]) -> tuple[str, ...]:
        return (*(f"version.file:{name}" for name in files), "latest.put")

    latest_step = "latest.put"

    def check(self) -> None:
        """Bucket reachable with these credentials; StorageSetupError naming what to fix."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise StorageSetupError(
                "access_key_id", "no S3 credentials (set it and secret_access_key, or AWS_ACCESS_KEY_ID)"
            ) from None
        except ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            code = exc.response.get("Error", {}).get("Code", "")
            if status == 404 or code in ("NoSuchBucket", "404"):
                raise StorageSetupError("root", f"bucket {self.bucket!r} does not exist at {self._where()}") from None
            if status in (401, 403):
                raise StorageSetupError(
                    "access_key_id",
                    f"access to bucket {self.bucket!r} at {self._where()} denied (HTTP {status} {code}): "
                    "wrong access key or secret_access_key, or no permission on the bucket",
                ) from None
            raise StorageSetupError("root", f"bucket {self.bucket!r} at {self._where()}: {exc}") from None
        except BotoCoreError as exc:
            raise StorageSetupError("endpoint_url", f"cannot reach {self._where()}: {exc}") from None

    def _where(self) -> str:
        return self.endpoint_url or "AWS S3"

    def put_version(self, model: str, number: int, files: Sequence[tuple[str, bytes]], step: Step = _no_step) -> str:
        if self._exists(self._version_key(model, number, MANIFEST)):
            raise VersionExists(f"version {number} of {model} already exists at {self.version_uri(model, number)}")
        for name, data in files:
            key = self._version_key(model, number, name)
            try:
                if name == MANIFEST:
                    self._put_new(key, data)
                else:
                    self._call("put_object", Bucket=self.bucket, Key=key, Body=data)
            except FileExistsError:
                raise VersionExists(f"version {number} of {model} was committed by another publisher") from None
            step(f"version.file:{name}")
        return self.version_uri(model, number)

    def set_latest(self, model: str, number: int, step: Step = _no_step) -> None:
        self._call("put_object", Bucket=self.bucket, Key=f"{self._model_key(model)}/{LATEST_FILE}", Body=f"{number}\n")
        step("latest.put")

    def latest(self, model: str) -> int | None:
        key = f"{self._model_key(model)}/{LATEST_FILE}"
        with self._lock:
            known = self._latest.get(model)
        try:
            extra = {"IfNoneMatch": known[0]} if known else {}
            response = self._call("get_object", Bucket=self.bucket, Key=key, **extra)
        except FileNotFoundError:
            with self._lock:
                self._latest.pop(model, None)
            return None
        except _NotModified:
            assert known is not None
            return known[1]
        text = response["Body"].read().decode("ascii", "replace")
        if not re.fullmatch(r"\d+\n?", text):
            raise StorageError(f"s3://{self.bucket}/{key} holds {text[:20]!r}, not a version number")
        number = int(text)
        with self._lock:
            self._latest[model] = (response["ETag"], number)
        return number

    def versions(self, model: str) -> list[int]:
        prefix = self._versions_prefix(model)
        numbers = set()
        for obj in self._list(prefix):
            found = _VERSION_KEY.fullmatch(obj["Key"][len(prefix) :])
            if found and found.group(2) == MANIFEST:
                numbers.add(int(found.group(1)))
        self._prune_cache(model, numbers)
        return sorted(numbers)

    def read(self, model: str, number: int, name: str) -> bytes:
        if "/" in name or name.startswith("."):
            raise StorageError(f"bad file name {name!r}")
        if name == MANIFEST:
            response = self._call("get_object", Bucket=self.bucket, Key=self._version_key(model, number, name))
            with self._lock:
                self._manifest_etag[(model, number)] = response["ETag"].strip('"')
            return bytes(response["Body"].read())
        with self._lock:
            etag = self._manifest_etag.get((model, number))
        cached = self._cache_path(model, number, etag, name) if etag else None
        if cached is not None and cached.is_file():
            return cached.read_bytes()
        response = self._call("get_object", Bucket=self.bucket, Key=self._version_key(model, number, name))
        data = bytes(response["Body"].read())
        if cached is not None:
            _write_atomic(cached, data)
        return data

    def _segment_key(self, model: str, name: str) -> str:
        if not _SEGMENT_NAME.fullmatch(name):
            raise StorageError(f"bad segment name {name!r}")
        return f"{self._model_key(model)}/{SEGMENTS_DIR}/{name}"

    def put_segment(self, model: str, name: str, data: bytes) -> None:
        key = self._segment_key(model, name)
        if not self._exists(key):  # content-addressed: one that is there holds these bytes
            self._call("put_object", Bucket=self.bucket, Key=key, Body=data)

    def read_segment(self, model: str, name: str) -> bytes:
        """From the local cache when a copy there still hashes to its name, else fetched (and cached):
        a segment never changes, so a watcher fetches each one once."""
        cached = self.cache / model / SEGMENTS_DIR / name
        if cached.is_file():
            data = cached.read_bytes()
            if hashlib.sha256(data).hexdigest() == name.split(".", 1)[0]:
                return data
        response = self._call("get_object", Bucket=self.bucket, Key=self._segment_key(model, name))
        data = bytes(response["Body"].read())
        _write_atomic(cached, data)
        return data

    def segments(self, model: str) -> dict[str, float]:
        prefix = f"{self._model_key(model)}/{SEGMENTS_DIR}/"
        return {
            obj["Key"][len(prefix) :]: obj["LastModified"].timestamp()
            for obj in self._list(prefix)
            if _SEGMENT_NAME.fullmatch(obj["Key"][len(prefix) :])
        }

    def keep_cached(self, model: str, segments: set[str]) -> None:
        directory = self.cache / model / SEGMENTS_DIR
        for path in directory.iterdir() if directory.is_dir() else []:
            if path.name not in segments:
                path.unlink(missing_ok=True)

    def delete_segment(self, model: str, name: str) -> None:
        self._call("delete_object", Bucket=self.bucket, Key=self._segment_key(model, name))
        (self.cache / model / SEGMENTS_DIR / name).unlink(missing_ok=True)

    def forget(self, model: str, number: int) -> bool:
        directory = self.cache / model
        removed = False
        for entry in directory.glob(f"{version_name(number)}-*") if directory.is_dir() else []:
            shutil.rmtree(entry, ignore_errors=True)
            removed = True
        return removed

    def published_at(self, model: str, number: int) -> float:
        head = self._call("head_object", Bucket=self.bucket, Key=self._version_key(model, number, MANIFEST))
        return float(head["LastModified"].timestamp())

    def delete_version(self, model: str, number: int) -> None:
        # the manifest first: from this request on, the version does not exist for new readers
        self._call("delete_object", Bucket=self.bucket, Key=self._version_key(model, number, MANIFEST))
        self._delete_prefix(self._version_key(model, number))
        self.forget(model, number)

    def cleanup(self, model: str, stale_s: float = STALE_S) -> list[str]:
        """Prefixes of versions without a manifest whose newest object is older than `stale_s` (a
        publish that died; a live one writes its few files within seconds)."""
        prefix = self._versions_prefix(model)
        newest: dict[str, float] = {}
        committed: set[str] = set()
        for obj in self._list(prefix):
            found = _VERSION_KEY.fullmatch(obj["Key"][len(prefix) :])
            if not found:
                continue
            name = found.group(1)
            newest[name] = max(newest.get(name, 0.0), obj["LastModified"].timestamp())
            if found.group(2) == MANIFEST:
                committed.add(name)
        now = time.time()
        removed = []
        for name, modified in sorted(newest.items()):
            if name not in committed and now - modified > stale_s:
                self._delete_prefix(f"{prefix}{name}/")
                removed.append(name)
        return removed

    # ------------------------------------------------------------------ helpers

    def _call(self, operation: str, **kwargs: Any) -> Any:
        """One S3 request; a missing key is FileNotFoundError, 304 is _NotModified, the rest StorageError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, operation)(**kwargs)
        except ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            code = exc.response.get("Error", {}).get("Code", "")
            where = f"{self.uri} {kwargs.get('Key', '')}".strip()
            if status == 304:
                raise _NotModified() from None
            if code in ("NoSuchKey", "404", "NotFound") or (status == 404 and code != "NoSuchBucket"):
                raise FileNotFoundError(f"{where}: no such object") from None
            if status == 412 and operation == "put_object":
                raise FileExistsError(f"{where}: already exists") from None
            if status == 501:
                raise _NotImplemented(f"{operation} {where}: {code}") from None
            raise StorageError(f"{operation} {where}: HTTP {status} {code}: {exc}") from None
        except BotoCoreError as exc:
            raise StorageError(f"{operation} {self.uri} at {self._where()}: {exc}") from None

    def _put_new(self, key: str, data: bytes) -> None:
        """PUT that fails (FileExistsError) when the key exists, where the server can say so: AWS
        and MinIO honour If-None-Match: *, so two publishers can never both commit one number.
        A server that answers 501 to it gets plain PUTs from then on (the model lock still holds)."""
        if self._conditional_put:
            try:
                self._call("put_object", Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
                return
            except _NotImplemented:
                self._conditional_put = False
        self._call("put_object", Bucket=self.bucket, Key=key, Body=data)

    def _exists(self, key: str) -> bool:
        try:
            self._call("head_object", Bucket=self.bucket, Key=key)
        except FileNotFoundError:
            return False
        return True

    def _list(self, prefix: str) -> list[dict[str, Any]]:
        objects: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._call("list_objects_v2", Bucket=self.bucket, Prefix=prefix, **extra)
            objects += page.get("Contents", [])
            if not page.get("IsTruncated"):
                return objects
            token = page["NextContinuationToken"]

    def _delete_prefix(self, prefix: str) -> None:
        # one DELETE per key: a version has two or three objects, and DeleteObjects needs a body
        # checksum header (Content-MD5 or the SDK's CRC) that not every S3-compatible server takes
        for obj in self._list(prefix):
            self._call("delete_object", Bucket=self.bucket, Key=obj["Key"])

    def _cache_path(self, model: str, number: int, etag: str, name: str) -> Path:
        return self.cache / model / f"{version_name(number)}-{etag}" / name

    def _prune_cache(self, model: str, present: set[int]) -> None:
        """Drop cached copies of versions no longer on the store: the cache never outgrows retention."""
        directory = self.cache / model
        if not directory.is_dir():
            return
        for entry in directory.iterdir():
            number = entry.name.split("-", 1)[0]
            if number.isdigit() and int(number) not in present:
                shutil.rmtree(entry, ignore_errors=True)


class _NotModified(Exception):
    """A conditional GET answered 304: the object still has the ETag we sent."""


class _NotImplemented(StorageError):
    """The server does not implement what the request asked (HTTP 501)."""


def _write_atomic(path: Path, data: bytes) -> None:
    """A cached file appears whole or not at all (two readers may fetch the same file at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_PARTIAL}{path.name}-{os.getpid()}-{threading.get_ident()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
