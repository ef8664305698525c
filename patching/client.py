"""Downstream: load the newest good published version, and keep a running service on it.

    from patching.client import load_latest, CheckpointWatcher

    loaded = load_latest("/mnt/shared/patchd", "fever-minilm", base_dir)   # once, e.g. a batch job
    loaded.model, loaded.version
    loaded.why(tokenizer(texts, return_tensors="pt", padding=True))  # which corrections shape each answer

    watcher = CheckpointWatcher("/mnt/shared/patchd", "fever-minilm", base_dir, interval=1.0).start()
    model = watcher.model          # at the start of each request: a whole model, never half-swapped

Every version is verified before it is served: the manifest's own checksum, its signature when
`trusted_keys` are given (patching/signing.py: unsigned, forged or signed by an unknown key is
refused), then every file's size and sha256, then the base identity recorded in patch_config.json
against the weights in `base_dir`.
A version that fails is refused (and never retried: versions are immutable) and the newest good
one at or below LATEST is served instead, with one warning line naming both and the reason.

The watcher loads the base once and builds each version on a private copy of it, so a request
that holds the previous model finishes on it undisturbed; the swap is one reference assignment
under a lock. It keeps the segments of the version it serves, so a new version costs only the
segments it adds (one small one per new patch, usually) and its manifest. It polls LATEST (a few
bytes) every `interval` seconds; given Kafka settings it also
listens to `<topic>.releases` and checks at once when a release for its model arrives (the poll
stays as the fallback). kafka-python is imported only then: this is patching/'s one Kafka use.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patching import patchfile
from patching.checkpoint import CheckpointError, VerifiedVersion, VersionMissing, read_verified
from patching.loading import attach_patches, base_identity
from patching.patchfile import CONFIG_FILE, PATCHES_FILE, PatchConfig, PatchStateError, parse_patch_set
from patching.provenance import Firing, why
from patching.signing import TrustedKeys, load_trusted
from patching.storage import Storage, StorageError
from patching.storage_uri import open_storage

log = logging.getLogger(__name__)

# poll LATEST this often by default: a fix reaches a service within about a second
DEFAULT_INTERVAL_S = 1.0
# back-off of the releases listener after a Kafka error (the LATEST poll keeps working meanwhile)
LISTEN_RETRY_S = 5.0


class NoGoodVersion(RuntimeError):
    """Versions are published, but none of them may be served with this base."""


@dataclass(frozen=True)
class Loaded:
    """A ready model and what it is: `version` None means the plain base (nothing published yet)."""

    model: Any
    version: int | None
    edits: tuple[int, ...] = ()
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)
    loaded_at: float = 0.0  # epoch seconds this model became servable
    # edit id -> who and what is behind it, as the version carries it (patching/provenance.py)
    provenance: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)

    def why(self, inputs: Mapping[str, Any]) -> list[list[Firing]]:
        """For each row of a tokenized batch, the corrections that shape the model's answer: the
        edits whose neurons fire where it reads the answer, their share of the patch's change,
        and the mistake, target, reporters and versions behind each (no database needed)."""
        return why(self.model, inputs, self.provenance)


@dataclass(frozen=True)
class KafkaReleases:
    """Where release events come from: kafka-python client settings and the releases topic."""

    bootstrap_servers: str | list[str]
    topic: str = "corrections.releases"
    config: dict[str, Any] = field(default_factory=dict)  # security_protocol, ssl_*, sasl_* ...


class _Base:
    """The base model loaded once, its identity computed once; versions are built on copies."""

    def __init__(self, base_dir: str | Path, arch: dict[str, Any] | None):
        from patching.loading import load_base_model

        self.dir = Path(base_dir)
        self.identity = base_identity(self.dir)
        self.arch = arch
        self.pristine = load_base_model(self.dir)

    def build(self, v: VerifiedVersion, fresh: bool = True) -> Any:
        """A patched model for a verified version (PatchStateError for a shape or identity mismatch)."""
        config, patches = patch_set(v)
        model = copy.deepcopy(self.pristine) if fresh else self.pristine
        return attach_patches(model, config, patches, self.identity, self.arch)


def patch_set(v: VerifiedVersion) -> tuple[PatchConfig, patchfile.PatchTensors]:
    """A verified version's config and neurons: its segments one after the other (format 2), or its
    patch_config.json and patches.safetensors (format 1); PatchStateError when they disagree."""
    where = f"version {v.number}"
    if not v.segmented:
        return parse_patch_set(v.files[CONFIG_FILE], v.files[PATCHES_FILE], where=where)
    config = v.config
    parts = [patchfile.decode(data, where=f"{where}/{name}") for name, data in v.segments.items()]
    patches = patchfile.concat(parts, config.hidden_size)
    if patches.edit_ids != config.edit_ids or int(patches.keys.shape[1]) != config.hidden_size:
        raise PatchStateError(f"{where}: its segments' neurons are not those its manifest lists")
    return config, patches


def local_files(v: VerifiedVersion) -> list[tuple[str, bytes]]:
    """A verified version as the two files load_patched reads from a directory (`patchd export`)."""
    if not v.segmented:
        return [(CONFIG_FILE, v.files[CONFIG_FILE]), (PATCHES_FILE, v.files[PATCHES_FILE])]
    config, patches = patch_set(v)
    blob = patchfile.encode(patches.keys, patches.biases, patches.values, patches.edit_ids, subject=patches.subject)
    return [(CONFIG_FILE, patchfile.config_bytes(config)), (PATCHES_FILE, blob)]


def _newest_good(
    storage: Storage,
    model: str,
    base: _Base,
    refused: dict[int, str],
    fresh: bool = True,
    serving: int | None = None,
    trusted: TrustedKeys | None = None,
    held: dict[str, bytes] | None = None,
) -> tuple[VerifiedVersion | None, Any, str | None]:
    """(version, its model, a warning or None) for the newest servable version at or below LATEST.

    `refused` (number -> reason) is read and extended: a refused version is never tried again.
    When that version is `serving` (already loaded, and versions never change) it is not read
    again and the model returned is None. (None, None, None) when nothing was ever published;
    NoGoodVersion when nothing is servable.
    """
    missing: dict[int, str] = {}  # not there (yet): tried again next time, unlike `refused`
    try:
        pointer: int | None = storage.latest(model)
        # no LATEST: nothing was released, even if a first publish died after writing its version
        numbers = [n for n in storage.versions(model) if n <= pointer] if pointer is not None else []
        unreadable = None
    except StorageError as exc:
        pointer, numbers, unreadable = None, storage.versions(model), str(exc)
    if pointer is None and not numbers and unreadable is None:
        return None, None, None
    # LATEST's version is read even when the listing lacks it: an NFS client may list a directory
    # from its cache for a few seconds after it sees the new LATEST
    for number in sorted({*numbers, *([pointer] if pointer is not None else [])}, reverse=True):
        if number in refused:
            continue
        if number == serving:
            return None, None, _fallback_warning(model, number, pointer, {**refused, **missing}, unreadable)
        try:
            v = read_verified(storage, model, number, trusted, held)
            built = base.build(v, fresh)
        except VersionMissing as exc:
            missing[number] = str(exc)
            continue
        except (CheckpointError, PatchStateError) as exc:
            refused[number] = str(exc)
            continue
        return v, built, _fallback_warning(model, number, pointer, {**refused, **missing}, unreadable)
    why_not = {**refused, **missing}
    reasons = "; ".join(f"version {n}: {why}" for n, why in sorted(why_not.items(), reverse=True)[:5])
    raise NoGoodVersion(f"no servable version of {model} on {storage.uri}: {unreadable or ''} {reasons}".strip())


def _fallback_warning(
    model: str, number: int, pointer: int | None, refused: dict[int, str], unreadable: str | None
) -> str | None:
    if unreadable is not None:
        return f"LATEST of {model} is unreadable ({unreadable}); serving version {number}, the newest good one"
    if number != pointer:
        why = refused.get(pointer) if pointer is not None else None
        return f"refused version {pointer} of {model} ({why}); serving version {number}, the newest good one"
    return None


def load_latest(
    root: str | Path | Storage,
    model: str,
    base_dir: str | Path,
    *,
    arch: dict[str, Any] | None = None,
    trusted_keys: Sequence[str | Path] | None = None,
) -> Loaded:
    """The newest good version of `model` on `root`, attached to the base in `base_dir`, ready to run.

    Falls back from a refused LATEST to the newest good version below it (logged); with nothing
    published yet it returns the plain base (version None); NoGoodVersion when nothing is servable.
    With `trusted_keys` (public key files, patching/signing.py) only versions signed by one of them
    are good; SigningError when a key file cannot be used.
    """
    trusted = load_trusted(trusted_keys) if trusted_keys is not None else None
    storage = open_storage(root)
    base = _Base(base_dir, arch)
    v, built, warning = _newest_good(storage, model, base, {}, fresh=False, trusted=trusted)
    if warning:
        log.warning(warning)
    if v is None:
        log.info("no version of %s published on %s yet: serving the base", model, storage.uri)
        return Loaded(base.pristine, None, loaded_at=time.time())
    return Loaded(built, v.number, tuple(v.edits), v.manifest, time.time(), v.provenance)


class CheckpointWatcher:
    """Keeps the newest good version loaded and swaps it in between requests (module docstring).

    watcher.model / watcher.current() are thread-safe; `on_swap(loaded)` runs on the watcher's
    thread after each swap. Use start()/stop() or a `with` block.
    """

    def __init__(
        self,
        root: str | Path | Storage,
        model: str,
        base_dir: str | Path,
        interval: float = DEFAULT_INTERVAL_S,
        *,
        on_swap: Callable[[Loaded], None] | None = None,
        releases: KafkaReleases | None = None,
        arch: dict[str, Any] | None = None,
        trusted_keys: Sequence[str | Path] | None = None,
    ):
        if interval <= 0:
            raise ValueError("interval must be > 0 seconds")
        self.trusted = load_trusted(trusted_keys) if trusted_keys is not None else None
        self.storage = open_storage(root)
        self.name = model
        self.interval = interval
        self.on_swap = on_swap
        self.releases = releases
        self._base = _Base(base_dir, arch)
        self._lock = threading.Lock()  # guards _current: held only for the swap itself
        self._checking = threading.Lock()
        self._refused: dict[int, str] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.swaps = 0
        self.errors = 0
        self._warned: str | None = None  # the last fallback warning, logged once, not every poll
        self._current = Loaded(self._base.pristine, None, loaded_at=time.time())
        self._segments: dict[str, bytes] = {}  # those of the version served (format 2), by name
        try:
            self.check()  # serve the newest good version from the first request on
        except NoGoodVersion as exc:
            log.error("%s; serving the base until a good version is published", exc)

    # ------------------------------------------------------------------ serving side

    def current(self) -> Loaded:
        with self._lock:
            return self._current

    @property
    def model(self) -> Any:
        return self.current().model

    @property
    def version(self) -> int | None:
        return self.current().version

    @property
    def refused(self) -> dict[int, str]:
        """The versions refused so far, with the reason (never tried again: versions are immutable)."""
        return dict(self._refused)

    # ------------------------------------------------------------------ watching

    def check(self) -> bool:
        """Look at LATEST once; load and swap when it moved. True when a new model was swapped in."""
        with self._checking:  # the poller, the listener's wake-up and a caller never build twice at once
            return self._check()

    def _check(self) -> bool:
        try:
            pointer = self.storage.latest(self.name)
        except StorageError:
            pointer = -1  # unreadable: let _newest_good log it and find a good one
        current = self.current()
        if pointer is None or pointer == current.version or pointer in self._refused:
            return False
        v, built, warning = _newest_good(
            self.storage,
            self.name,
            self._base,
            self._refused,
            serving=current.version,
            trusted=self.trusted,
            held=self._segments,
        )
        if warning and warning != self._warned:
            log.warning(warning)
        self._warned = warning
        if v is None or v.number == current.version:
            return False
        loaded = Loaded(built, v.number, tuple(v.edits), v.manifest, time.time(), v.provenance)
        with self._lock:
            self._current = loaded
        self._segments = dict(v.segments)  # the next version fetches only the segments it adds
        self.storage.keep_cached(self.name, set(v.segments))
        self.swaps += 1
        log.info("serving version %s of %s (%d edits)", v.number, self.name, len(v.edits))
        if self.on_swap is not None:
            self.on_swap(loaded)
        return True

    def start(self) -> CheckpointWatcher:
        if self._threads:
            return self
        self._stop.clear()
        self._threads.append(threading.Thread(target=self._poll, name="patchd-watcher", daemon=True))
        if self.releases is not None:
            self._threads.append(threading.Thread(target=self._listen, name="patchd-releases", daemon=True))
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=10)
        self._threads = []

    def __enter__(self) -> CheckpointWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check()
            except NoGoodVersion as exc:
                self.errors += 1
                log.error("%s; still serving version %s", exc, self.version)
            except Exception:  # an NFS hiccup, a file deleted while read: the next poll tries again
                self.errors += 1
                log.exception("checking for a new version of %s failed; retrying", self.name)

    def _listen(self) -> None:
        """Wake the poller when a release of this model arrives on the releases topic."""
        import json

        from kafka import KafkaConsumer

        assert self.releases is not None
        while not self._stop.is_set():
            consumer = None
            try:
                consumer = KafkaConsumer(
                    self.releases.topic,
                    bootstrap_servers=self.releases.bootstrap_servers,
                    group_id=None,  # every service instance hears every release
                    auto_offset_reset="latest",
                    enable_auto_commit=False,
                    **self.releases.config,
                )
                while not self._stop.is_set():
                    for records in consumer.poll(timeout_ms=500).values():
                        for record in records:
                            try:
                                event = json.loads(record.value)
                            except (ValueError, TypeError):
                                continue
                            if isinstance(event, dict) and event.get("model") == self.name:
                                self._wake.set()
            except Exception:  # the broker is away: LATEST polling carries on meanwhile
                log.exception("listening to %s failed; retrying in %ss", self.releases.topic, LISTEN_RETRY_S)
                self._stop.wait(LISTEN_RETRY_S)
            finally:
                if consumer is not None:
                    consumer.close()
