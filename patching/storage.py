"""Where published checkpoints live: one small interface, and its local / NFS file-system implementation.

    storage = open_storage("/mnt/shared/patchd")        # patching/storage_uri.py; or file://, s3://
    storage.put_version(model, 42, [(name, data), ..., ("manifest.json", data)])   # manifest last
    storage.set_latest(model, 42)
    storage.latest(model) -> 42 | None
    storage.versions(model) -> [1, ..., 42]              # complete versions only, ascending
    storage.read(model, 42, "manifest.json") -> bytes
    storage.delete_version(model, 3)
    storage.cleanup(model)                               # leftovers of publishes that died

Layout (DESIGN §5):
    <root>/<model>/versions/000042/manifest.json         (format 1 also patches.safetensors, patch_config.json)
    <root>/<model>/segments/<sha256>.safetensors         immutable, named by their content, shared by versions
    <root>/<model>/LATEST                                "42\\n"

The contract every implementation keeps, whatever the medium:
- `put_version` makes a version visible all at once or not at all, and refuses a number in use;
  the manifest is the last thing written, so anything without one is not a version;
- `set_latest` replaces the pointer atomically: a reader gets the old or the new number;
- versions are immutable; `delete_version` makes one invisible before removing its bytes;
- a segment is written whole under its sha256 or not at all, and never changes; writing one that
  is there already is a no-op. Which segments a version uses is its manifest's business.

Checksums are not this module's business: patching/checkpoint.py verifies what is read, so a
medium that corrupts bytes is caught, whichever medium it is. The object store (S3 and
S3-compatible servers) is patching/s3storage.py: it has no rename, so it writes the files, then
the manifest as the commit marker, and its `versions` lists only prefixes that hold a manifest.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

LATEST_FILE = "LATEST"
VERSIONS_DIR = "versions"
SEGMENTS_DIR = "segments"
_SEGMENT_NAME = re.compile(r"[0-9a-f]{64}\.safetensors")
# six digits sort as text and as numbers up to 999,999 versions; longer numbers still parse
VERSION_DIGITS = 6
_VERSION_NAME = re.compile(r"\d{6,}")
# temp and trash entries start with "." so no listing ever takes them for versions
_TMP, _TRASH, _LATEST_TMP = ".tmp-", ".trash-", ".LATEST.tmp-"
# a leftover of another host (or an unknown pid) is removed only when older than this
STALE_S = 3600.0

Step = Callable[[str], None]  # called after each durable step; the publisher's fault-injection point


def _no_step(_: str) -> None:
    pass


class StorageError(OSError):
    """Storage that cannot be used as asked (a bad LATEST, an unknown URI scheme)."""


class StorageSetupError(StorageError):
    """Storage that cannot be reached as configured; `setting` names the [storage] key to fix."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


class VersionExists(StorageError):
    """put_version for a number that is already taken (another publisher got there first)."""


def version_name(number: int) -> str:
    return f"{number:0{VERSION_DIGITS}d}"


def segment_name(sha256: str) -> str:
    """A segment's file name: its content's sha256 (hex), so a name says what its bytes must hash to."""
    name = f"{sha256}.safetensors"
    if not _SEGMENT_NAME.fullmatch(name):
        raise StorageError(f"bad segment sha256 {sha256!r}")
    return name


class Storage(ABC):
    """The operations the publisher and the client need, and nothing else (see the module docstring)."""

    uri: str
    # the step (see Step) after which LATEST names the new version
    latest_step: str

    @abstractmethod
    def write_steps(self, files: Sequence[str]) -> tuple[str, ...]:
        """The durable steps of put_version(files) then set_latest, in order (the crash tests' list)."""

    @abstractmethod
    def check(self) -> None:
        """Usable as configured, or StorageSetupError naming the setting (run once at start-up)."""

    def forget(self, model: str, number: int) -> bool:
        """Drop local copies of a version's files, if this medium keeps any; True when it did."""
        return False

    def keep_cached(self, model: str, segments: set[str]) -> None:
        """Drop local copies of every segment but these (a reader keeps those of what it serves)."""
        return None  # this medium keeps no local copies

    @abstractmethod
    def put_version(self, model: str, number: int, files: Sequence[tuple[str, bytes]], step: Step = _no_step) -> str:
        """Publish version `number`; `files` in write order, the manifest last. Returns its URI."""

    @abstractmethod
    def set_latest(self, model: str, number: int, step: Step = _no_step) -> None:
        """Point LATEST at `number`, atomically."""

    @abstractmethod
    def latest(self, model: str) -> int | None:
        """LATEST's number; None when nothing was ever published; StorageError when unreadable."""

    @abstractmethod
    def versions(self, model: str) -> list[int]:
        """Numbers of the complete versions present, ascending."""

    @abstractmethod
    def read(self, model: str, number: int, name: str) -> bytes:
        """One file of a version (OSError when it is not there)."""

    @abstractmethod
    def published_at(self, model: str, number: int) -> float:
        """When the version became visible (epoch seconds); retention's grace period uses it."""

    @abstractmethod
    def delete_version(self, model: str, number: int) -> None:
        """Remove a version: invisible first, then its bytes."""

    @abstractmethod
    def cleanup(self, model: str, stale_s: float = STALE_S) -> list[str]:
        """Remove what publishes and deletions that died left behind; returns what was removed."""

    @abstractmethod
    def put_segment(self, model: str, name: str, data: bytes) -> None:
        """Store a segment under its name (segment_name of its sha256), whole; a no-op when present."""

    @abstractmethod
    def read_segment(self, model: str, name: str) -> bytes:
        """One segment's bytes (FileNotFoundError when it is not there)."""

    @abstractmethod
    def segments(self, model: str) -> dict[str, float]:
        """Every segment present: name -> when it was written (epoch seconds)."""

    @abstractmethod
    def delete_segment(self, model: str, name: str) -> None:
        """Remove one segment (retention does, once no kept version lists it)."""

    def version_uri(self, model: str, number: int) -> str:
        return f"{self.uri.rstrip('/')}/{model}/{VERSIONS_DIR}/{version_name(number)}/"


class FileStorage(Storage):
    """A local or network (NFS) file system.

    A version is written into a hidden temporary directory, every file and the directory fsynced,
    then renamed into place (rename is atomic on POSIX file systems and NFS). LATEST is a temporary
    file, fsynced, renamed over the old one; the parent directory is fsynced after each rename so
    the change survives a power cut. Deleting renames the version to a hidden trash name first.
    """

    latest_step = "latest.renamed"

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()

    def write_steps(self, files: Sequence[str]) -> tuple[str, ...]:
        named = tuple(f"version.file:{name}" for name in files)
        return ("version.tmpdir", *named, "version.renamed", "latest.tmp", "latest.renamed")

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageSetupError("root", f"{self.root}: cannot create it: {exc.strerror or exc}") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageSetupError("root", f"{self.root}: not writable by this user")

    def _model_dir(self, model: str) -> Path:
        if not model or "/" in model or model.startswith("."):
            raise StorageError(f"model name {model!r} cannot be a directory name")
        return self.root / model

    def _versions_dir(self, model: str) -> Path:
        return self._model_dir(model) / VERSIONS_DIR

    def put_version(self, model: str, number: int, files: Sequence[tuple[str, bytes]], step: Step = _no_step) -> str:
        versions = self._versions_dir(model)
        versions.mkdir(parents=True, exist_ok=True)
        final = versions / version_name(number)
        if final.exists():
            raise VersionExists(f"version {number} of {model} already exists at {final}")
        tmp = versions / f"{_TMP}{version_name(number)}-{os.getpid()}-{secrets.token_hex(4)}-{socket.gethostname()}"
        tmp.mkdir()
        step("version.tmpdir")
        for name, data in files:
            _write_synced(tmp / name, data)
            step(f"version.file:{name}")
        _fsync_dir(tmp)
        try:
            # a directory renamed onto an existing non-empty one fails: two publishers never share a number
            os.rename(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise VersionExists(f"version {number} of {model} already exists at {final}") from exc
            raise
        _fsync_dir(versions)
        step("version.renamed")
        return final.as_uri() + "/"

    def set_latest(self, model: str, number: int, step: Step = _no_step) -> None:
        directory = self._model_dir(model)
        tmp = directory / f"{_LATEST_TMP}{os.getpid()}-{secrets.token_hex(4)}-{socket.gethostname()}"
        _write_synced(tmp, f"{number}\n".encode())
        step("latest.tmp")
        os.replace(tmp, directory / LATEST_FILE)
        _fsync_dir(directory)
        step("latest.renamed")

    def latest(self, model: str) -> int | None:
        path = self._model_dir(model) / LATEST_FILE
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise StorageError(f"cannot read {path}: {exc}") from exc
        if not re.fullmatch(r"\d+\n?", text):
            raise StorageError(f"{path} holds {text[:20]!r}, not a version number")
        return int(text)

    def versions(self, model: str) -> list[int]:
        try:
            entries = list(self._versions_dir(model).iterdir())
        except FileNotFoundError:
            return []
        return sorted(int(p.name) for p in entries if _VERSION_NAME.fullmatch(p.name) and p.is_dir())

    def read(self, model: str, number: int, name: str) -> bytes:
        if "/" in name or name.startswith("."):
            raise StorageError(f"bad file name {name!r}")
        return (self._versions_dir(model) / version_name(number) / name).read_bytes()

    def published_at(self, model: str, number: int) -> float:
        # the directory's mtime is when its last file was created, just before the rename
        return (self._versions_dir(model) / version_name(number)).stat().st_mtime

    def delete_version(self, model: str, number: int) -> None:
        versions = self._versions_dir(model)
        trash = versions / f"{_TRASH}{version_name(number)}-{os.getpid()}-{secrets.token_hex(4)}-{socket.gethostname()}"
        # invisible at once to new readers; a reader that already opened a file keeps reading it
        # (POSIX keeps unlinked open files; NFS clients "silly-rename" them until closed)
        os.rename(versions / version_name(number), trash)
        _fsync_dir(versions)
        shutil.rmtree(trash, ignore_errors=True)

    def _segments_dir(self, model: str) -> Path:
        return self._model_dir(model) / SEGMENTS_DIR

    def put_segment(self, model: str, name: str, data: bytes) -> None:
        if not _SEGMENT_NAME.fullmatch(name):
            raise StorageError(f"bad segment name {name!r}")
        directory = self._segments_dir(model)
        final = directory / name
        if final.exists():
            return  # content-addressed: the same name holds the same bytes
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"{_TMP}seg-{os.getpid()}-{secrets.token_hex(4)}-{socket.gethostname()}"
        try:
            _write_synced(tmp, data)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(directory)

    def read_segment(self, model: str, name: str) -> bytes:
        if not _SEGMENT_NAME.fullmatch(name):
            raise StorageError(f"bad segment name {name!r}")
        return (self._segments_dir(model) / name).read_bytes()

    def segments(self, model: str) -> dict[str, float]:
        try:
            entries = list(self._segments_dir(model).iterdir())
        except FileNotFoundError:
            return {}
        found: dict[str, float] = {}
        for path in entries:
            if _SEGMENT_NAME.fullmatch(path.name):
                try:
                    found[path.name] = path.stat().st_mtime
                except FileNotFoundError:
                    continue  # deleted meanwhile
        return found

    def delete_segment(self, model: str, name: str) -> None:
        if not _SEGMENT_NAME.fullmatch(name):
            raise StorageError(f"bad segment name {name!r}")
        (self._segments_dir(model) / name).unlink(missing_ok=True)

    def cleanup(self, model: str, stale_s: float = STALE_S) -> list[str]:
        removed: list[str] = []
        candidates: list[Path] = []
        for directory, prefixes in (
            (self._versions_dir(model), (_TMP, _TRASH)),
            (self._segments_dir(model), (_TMP,)),
            (self._model_dir(model), (_LATEST_TMP,)),
        ):
            try:
                candidates += [p for p in directory.iterdir() if p.name.startswith(prefixes)]
            except FileNotFoundError:
                continue
        now = time.time()
        for path in candidates:
            if not _abandoned(path, now, stale_s):
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
        return removed


# ---------------------------------------------------------------------------- helpers


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as fh:  # "x": a temp name is ours alone
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable; some file systems cannot fsync a directory."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _abandoned(path: Path, now: float, stale_s: float) -> bool:
    """A leftover whose writer is gone: a dead pid on this host, or anything older than `stale_s`."""
    parts = path.name.split("-", 4)  # .tmp-NNNNNN-PID-TOKEN-HOST / .LATEST.tmp-PID-TOKEN-HOST
    if path.name.startswith(_LATEST_TMP):
        parts = ["", "", *path.name[len(_LATEST_TMP) :].split("-", 2)]
    try:
        pid, host = int(parts[2]), parts[4]
    except (IndexError, ValueError):
        pid, host = -1, ""
    if host == socket.gethostname() and pid > 0 and pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's
        else:
            return False
    try:
        return now - path.stat().st_mtime > stale_s
    except FileNotFoundError:
        return False
