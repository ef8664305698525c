"""Versioned patch checkpoints on shared storage (DESIGN §5): build, publish, recover, prune.

A version is the full set of accepted, not removed patches at the moment it is published, in
acceptance order, built from the store rather than from the live model, so the daemon,
`patchd rollback` and `patchd revoke` all publish the same way. Versions hold patches only
(kilobytes), never base weights.

    publisher = Publisher(model, store, storage, base, releases=ReleaseSender(settings.kafka), keep=50)
    publisher.recover()               # at start: remove leftovers, record a version a crash left unrecorded
    publisher.publish_if_changed()    # a Published, or None when the patch set equals LATEST's
    publisher.prune()                 # keep the newest `keep` versions and LATEST's, delete the rest

The steps of one publish, in order. The process may die after any of them; PATCHD_FAULT_KILL_AT=<step>
SIGKILLs it right there (the crash tests do, at every step):

    publish.start                       nothing written yet
    segments.written                    the version's new segments are stored (each whole, under its sha256)
    version.tmpdir                      a hidden temporary directory exists
    version.file:manifest.json          the manifest written and fsynced inside it
    version.renamed                     the complete version is visible under its number; LATEST unchanged
    latest.tmp                          the new pointer is written and fsynced beside LATEST
    latest.renamed                      LATEST names the new version: readers get it from now on
    publish.released                    the release event is on <topic>.releases
    publish.recorded                    the versions table has its row

Readers follow LATEST: before `latest.renamed` they get the previous version, after it the new
one, never anything in between. Segments (patching/checkpoint.py, format 2) are cut from the
patches in acceptance order as blocks of SEGMENT_FANOUT**k patches, largest first, aligned, plus a
tail: adding a patch reuses every block and writes the new tail, or the block it completes. A
segment the parent (LATEST's version) has for exactly the same patches is reused, never rewritten.
Retention deletes a segment only when no remaining version lists it and it is older than the grace
period (a publish in flight writes its segments before its manifest).

A death before `latest.renamed` leaves segments no version lists (retention removes them), a
hidden temp directory (cleanup removes it) or a complete version nobody points at (its number is
never reused); `recover()` finishes a publish that died after it (the row, and the event again:
releases are at least once).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from daemon.logs import get_logger
from daemon.releases import ReleaseSender, release_event
from memory.records import PatchMeta, PatchRecord
from memory.store import Store
from patching import patchfile
from patching.checkpoint import (
    FORMAT,
    FORMAT_3,
    MANIFEST_FILE,
    CheckpointError,
    decode_manifest,
    encode_manifest,
    read_verified,
)
from patching.patchfile import CODE_VERSION, PatchConfig
from patching.storage import Storage, StorageError, VersionExists, segment_name

if TYPE_CHECKING:
    from daemon.model import PatchedModel
    from daemon.settings import Settings
    from patching.signing import Signer

log = get_logger(__name__)

FAULT_ENV = "PATCHD_FAULT_KILL_AT"
VERSION_FILES = (MANIFEST_FILE,)  # a format-2 version is its manifest; the neurons are in segments
# patches per segment block grow by this factor per level: 16, 256, 4096, 65536 ...
SEGMENT_FANOUT = 16


def publish_steps(storage: Storage) -> tuple[str, ...]:
    """Every fault point of one publish on `storage`, in order (the crash tests kill at each)."""
    return (
        "publish.start",
        "segments.written",
        *storage.write_steps(VERSION_FILES),
        "publish.released",
        "publish.recorded",
    )


def segment_plan(n: int, fanout: int = SEGMENT_FANOUT) -> list[tuple[int, int]]:
    """[start, end) ranges of n patches: aligned blocks of fanout**k patches (k >= 1), largest first,
    then a tail of fewer than `fanout`. n = 10,000 -> 2 x 4096, 7 x 256, 1 x 16: ten segments."""
    ranges: list[tuple[int, int]] = []
    size = fanout
    while size * fanout <= n:
        size *= fanout
    start = 0
    while size >= fanout:
        while start + size <= n:
            ranges.append((start, start + size))
            start += size
        size //= fanout
    if start < n:
        ranges.append((start, n))
    return ranges


def ids_digest(patch_ids: Sequence[int]) -> str:
    """Which patches a segment holds, as one value (a segment is reused only for exactly these)."""
    return hashlib.sha256(",".join(map(str, patch_ids)).encode()).hexdigest()


# a version is deleted only when it stopped being the newest this long ago: a reader that picked
# it up just before it was superseded has long finished reading a few megabytes by then
RETENTION_GRACE_S = 60.0
# another publisher may take a number between our look and our rename; then we take the next one
NUMBER_RETRIES = 3
# per-edit gate figures copied into the manifest (the full verdict stays in the patches table)
GATE_FIELDS = ("changed", "regressed", "retention_failed", "attempts", "heldout_active")


def fault_point(step: str) -> None:
    """Crash-test hook: SIGKILL this process right after `step` when PATCHD_FAULT_KILL_AT names it."""
    if os.environ.get(FAULT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class BaseInfo:
    """What every version's patch_config.json says about the base it was made for."""

    identity: str  # sha256 of the base's weight files (patching.loading.base_identity)
    name: str | None
    model_type: str
    hidden_size: int
    layer: int
    activation: str

    @classmethod
    def of_model(cls, model: PatchedModel) -> BaseInfo:
        from patching.loading import base_identity

        return cls(
            identity=base_identity(model.base.directory),
            name=model.base.name,
            model_type=str(model.base.model.config.model_type),
            hidden_size=int(model.patcher.site.hidden_size),
            layer=model.layer,
            activation=model.settings.trainer.activation,
        )

    @classmethod
    def of_config(cls, config: PatchConfig) -> BaseInfo:
        return cls(
            config.base_identity,
            config.base_name,
            config.model_type,
            config.hidden_size,
            config.layer,
            config.activation,
        )


@dataclass(frozen=True)
class Published:
    number: int
    parent: int | None
    neurons: int
    edits: list[int]
    patch_ids: list[int]
    added: list[int]
    removed: list[int]
    manifest_sha256: str
    uri: str
    size: int  # bytes of the whole version: its segments and manifest
    seconds: float  # build + write + flip + event + row
    latest_at: float  # epoch seconds when LATEST named it
    written: int = 0  # bytes this publish wrote: its new segments and the manifest


@dataclass
class _Latest:
    """What LATEST holds, as far as this publisher knows: "nothing changed?" compares against it."""

    number: int
    patch_ids: list[int]
    edits: list[int] = field(default_factory=list)
    segments: dict[str, dict[str, Any]] = field(default_factory=dict)  # ids_sha256 -> manifest entry


class Publisher:
    def __init__(
        self,
        model: str,
        store: Store,
        storage: Storage,
        base: BaseInfo,
        *,
        releases: ReleaseSender | None = None,
        keep: int = 50,
        grace_s: float = RETENTION_GRACE_S,
        signer: Signer | None = None,
    ):
        if keep < 1:
            raise ValueError("keep must be >= 1: LATEST's version is always kept")
        self.model = model
        self.store = store
        self.storage = storage
        self.base = base
        self.releases = releases
        self.keep = keep
        self.grace_s = grace_s
        self.signer = signer  # every manifest is signed with it (patching/signing.py); None: unsigned
        self.last_started = 0.0  # epoch seconds a publish last began (the rate limit counts from it)
        self.last_published_at: float | None = None
        self._lock = threading.Lock()  # one publish / prune at a time (scheduler jobs, the final publish)
        self._latest: _Latest | None = None
        self._recovered = False
        self._unsent: list[dict[str, Any]] = []  # release events to send again
        self._unrecorded = False  # a versions row failed to be written: reconcile before the next publish

    @property
    def last_version(self) -> int | None:
        return self._latest.number if self._latest else None

    # ------------------------------------------------------------------ start-up

    def recover(self) -> None:
        """Remove leftovers of dead publishes; record (and announce again) versions LATEST reached
        but the database did not; learn what LATEST holds."""
        with self._lock:
            self._recover()

    def _recover(self) -> None:
        removed = self.storage.cleanup(self.model)
        if removed:
            log.warning("removed leftovers of interrupted publishes", entries=removed)
        pointer = self._pointer()
        self._reconcile_rows(pointer, announce=True)
        self._latest = None
        if pointer is not None:
            try:
                v = read_verified(self.storage, self.model, pointer)
                self._latest = _Latest(pointer, v.patch_ids, v.edits, _reusable(v.manifest))
            except (CheckpointError, OSError) as exc:
                log.error(
                    "LATEST's version cannot be used; the next publish replaces it", version=pointer, error=str(exc)
                )
        self._recovered = True

    def _pointer(self) -> int | None:
        try:
            return self.storage.latest(self.model)
        except StorageError as exc:
            log.error("LATEST is unreadable; the next publish replaces it", error=str(exc))
            return None

    def _reconcile_rows(self, pointer: int | None, announce: bool) -> None:
        """The row for LATEST's version when the database lacks it (a publish died after the flip).

        Only LATEST's: a complete version that LATEST never named was never released, so it gets
        no row and no event; its number is simply never used again.
        """
        from sqlalchemy.exc import IntegrityError

        if pointer is None or pointer in {v.number for v in self.store.versions(self.model)}:
            self._unrecorded = False
            return
        try:
            v = read_verified(self.storage, self.model, pointer)
        except (CheckpointError, OSError) as exc:
            log.error("LATEST's version cannot be recorded", version=pointer, error=str(exc))
            return
        uri = self.storage.version_uri(self.model, pointer)
        try:
            self.store.add_version(
                self.model, pointer, v.manifest.get("parent"), v.manifest_sha256, v.edits, uri, v.patch_ids
            )
        except IntegrityError:
            pass  # recorded meanwhile by another process
        else:
            log.warning("recorded a version whose publish was interrupted after LATEST", version=pointer)
            if announce:  # the event may or may not have gone out: releases are at least once
                self._unsent.append(release_event(v.manifest, v.manifest_sha256, uri, time.time()))
        self._unrecorded = False

    # ------------------------------------------------------------------ publishing

    def publish_if_changed(self, reason: str = "patched", extra: dict[str, Any] | None = None) -> Published | None:
        """Publish the current patch set as a new version unless LATEST already holds exactly it."""
        with self._lock:
            if not self._recovered:
                self._recover()
            if self._unrecorded:
                self._reconcile_rows(self._pointer(), announce=False)
            self._send_unsent()
            ids = [patch_id for patch_id, _ in self.store.accepted_patch_ids(self.model)]
            if self._latest is None and not ids:
                return None  # nothing was ever accepted
            if self._latest is not None and ids == self._latest.patch_ids:
                return None
            self.last_started = time.time()
            # may have grown since the look: publish that; the neurons are read only for new segments
            patches = self.store.accepted_patch_meta(self.model)
            for attempt in range(NUMBER_RETRIES):
                try:
                    return self._publish(patches, self._next_number(), reason, extra or {})
                except VersionExists:
                    if attempt == NUMBER_RETRIES - 1:
                        raise
                    log.warning("version number taken by another publisher; trying the next one")
            raise AssertionError("unreachable")

    def _next_number(self) -> int:
        row = self.store.latest_version(self.model)
        taken = [0, *self.storage.versions(self.model), row.number if row else 0, self.last_version or 0]
        return max(taken) + 1

    def _publish(self, patches: Sequence[PatchMeta], number: int, reason: str, extra: dict[str, Any]) -> Published:
        t0 = time.perf_counter()
        parent = self._latest
        new_segments, body = self._build(patches, number, parent, reason, extra)
        manifest = encode_manifest(body, self.signer)
        edits = list(dict.fromkeys(p.mistake_id for p in patches))
        patch_ids = [p.id for p in patches]
        fault_point("publish.start")
        for name, data in new_segments:
            self.storage.put_segment(self.model, name, data)
        fault_point("segments.written")
        uri = self.storage.put_version(self.model, number, [(MANIFEST_FILE, manifest)], step=fault_point)
        self.storage.set_latest(self.model, number, step=fault_point)
        latest_at = time.time()
        sha = hashlib.sha256(manifest).hexdigest()
        self._latest = _Latest(number, patch_ids, edits, _reusable(body))
        self.last_published_at = latest_at
        self._unsent.append(release_event(body, sha, uri, latest_at))
        self._send_unsent()
        fault_point("publish.released")
        try:
            self.store.add_version(self.model, number, body["parent"], sha, edits, uri, patch_ids)
        except Exception as exc:  # noqa: BLE001 - LATEST already names it; the row is retried
            self._unrecorded = True
            log.error(
                "version published but not recorded; retried before the next publish", version=number, error=repr(exc)
            )
        fault_point("publish.recorded")
        published = Published(
            number=number,
            parent=body["parent"],
            neurons=body["neurons"],
            edits=edits,
            patch_ids=patch_ids,
            added=body["added"],
            removed=body["removed"],
            manifest_sha256=sha,
            uri=uri,
            size=sum(e["size"] for e in body["segments"]) + len(manifest),
            seconds=time.perf_counter() - t0,
            latest_at=latest_at,
            written=sum(len(data) for _, data in new_segments) + len(manifest),
        )
        log.info(
            "version published",
            version=number,
            parent=published.parent,
            reason=reason,
            edits=len(published.edits),
            neurons=published.neurons,
            added=published.added[:20],
            removed=published.removed[:20],
            bytes=published.size,
            written=published.written,
            ms=round(published.seconds * 1000, 1),
            latest_at=latest_at,
        )
        return published

    def _provenance(self, ids: list[int], number: int) -> list[dict[str, Any]]:
        """Who and what is behind each patch of a segment (memory/provenance.py), in patch order; a
        patch not published before has this version as its first."""
        found = self.store.provenance(ids)
        return [{**found[i], "first_version": found[i]["first_version"] or number} for i in ids]

    def _build(
        self, patches: Sequence[PatchMeta], number: int, parent: _Latest | None, reason: str, extra: dict[str, Any]
    ) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
        """The segments to write (name, bytes: those the parent does not have) and the manifest body."""
        created = datetime.now(UTC).isoformat()
        reuse = parent.segments if parent else {}
        entries: list[dict[str, Any]] = []
        new: list[tuple[str, bytes]] = []
        neurons = 0
        for start, end in segment_plan(len(patches)):
            part = patches[start:end]
            ids = [p.id for p in part]
            key = ids_digest(ids)
            entry = reuse.get(key)
            if entry is None:
                records = self.store.patches_by_id(ids)
                if [r.id for r in records] != ids:
                    raise RuntimeError(  # removed meanwhile (a revoke): the next publish plans again
                        f"patches {sorted(set(ids) - {r.id for r in records})} vanished while publishing"
                    )
                blob, neuron_edits = concat_neurons(
                    records,
                    self.base.hidden_size,
                    {
                        "patch_ids": json.dumps(ids),
                        "gate": json.dumps(gate_figures(part)["edits"], sort_keys=True),
                        "provenance": json.dumps(self._provenance(ids, number), sort_keys=True),
                    },
                )
                sha = hashlib.sha256(blob).hexdigest()
                layer = patchfile.header_of(blob)[1].get("subject_layer")
                entry = {
                    "sha256": sha,
                    "size": len(blob),
                    "neurons": len(neuron_edits),
                    "patches": len(ids),
                    "first_patch": ids[0],
                    "last_patch": ids[-1],
                    "ids_sha256": key,
                    **({"subject_layer": int(layer)} if layer is not None else {}),
                }
                new.append((segment_name(sha), blob))
            entries.append(entry)
            neurons += int(entry["neurons"])
        edits = list(dict.fromkeys(p.mistake_id for p in patches))
        before = parent.edits if parent else []
        before_set, edits_set = set(before), set(edits)
        added = [e for e in edits if e not in before_set]
        gate = gate_figures(patches)
        b = self.base
        subject_layers = {e["subject_layer"] for e in entries if "subject_layer" in e}
        if len(subject_layers) > 1:
            raise RuntimeError(f"segments with detectors on layers {sorted(subject_layers)}: one model, one layer")
        body: dict[str, Any] = {
            "format": FORMAT_3 if subject_layers else FORMAT,
            "model": self.model,
            "version": number,
            "parent": parent.number if parent else None,
            "created_at": created,
            "code_version": CODE_VERSION,
            "base": {"name": b.name, "identity": b.identity},
            "config": {
                "model_type": b.model_type,
                "layer": b.layer,
                "activation": b.activation,
                "hidden_size": b.hidden_size,
                **({"subject_layer": subject_layers.pop()} if subject_layers else {}),
            },
            "neurons": neurons,
            "patches": len(patches),
            "added": added,
            "removed": [e for e in before if e not in edits_set],
            "reason": reason,
            # totals over every edit; per edit only the added ones (each segment holds its own)
            "gate": {**gate, "edits": {k: v for k, v in gate["edits"].items() if int(k) in set(added)}},
            "segments": entries,
            **extra,
        }
        return new, body

    def _send_unsent(self) -> None:
        if self.releases is None:
            self._unsent.clear()
            return
        while self._unsent:
            event = self._unsent[0]
            try:
                self.releases.send(event)
            except Exception as exc:  # noqa: BLE001 - the version is live; pollers of LATEST have it
                log.error(
                    "release event not sent; retried with the next publish",
                    version=event["version"],
                    topic=self.releases.topic,
                    error=repr(exc),
                )
                return
            self._unsent.pop(0)

    # ------------------------------------------------------------------ retention

    def prune(self) -> list[int]:
        """Delete versions outside the newest `keep`, oldest first; never LATEST's, never one that was
        the newest less than `grace_s` ago (a reader may still be on it)."""
        with self._lock:
            try:
                pointer = self.storage.latest(self.model)
            except StorageError as exc:
                log.error("retention skipped: LATEST is unreadable, so its version cannot be protected", error=str(exc))
                return []
            numbers = self.storage.versions(self.model)
            protected = set(numbers[-self.keep :]) | {pointer}
            now = time.time()
            deleted: list[int] = []
            for i, number in enumerate(numbers):
                if number in protected:
                    continue
                if now - self.storage.published_at(self.model, numbers[i + 1]) < self.grace_s:
                    continue
                self.storage.delete_version(self.model, number)
                deleted.append(number)
            if deleted:
                log.info("old versions deleted", versions=deleted, kept=len(numbers) - len(deleted), latest=pointer)
            self._sweep_segments(now)
            return deleted

    def _sweep_segments(self, now: float) -> list[str]:
        """Delete segments no remaining version lists, once older than the grace period. Any version
        whose manifest cannot be read stops the sweep: its segments are unknown, so none may go."""
        try:
            stored = self.storage.segments(self.model)
            if not stored:
                return []
            used: set[str] = set()
            for number in self.storage.versions(self.model):
                manifest = decode_manifest(self.storage.read(self.model, number, MANIFEST_FILE), self.model, number)
                used.update(segment_name(e["sha256"]) for e in manifest.get("segments", []))
        except (OSError, CheckpointError) as exc:
            log.warning("segments not swept: a version's manifest is unreadable", error=str(exc))
            return []
        gone = [name for name, at in stored.items() if name not in used and now - at >= self.grace_s]
        for name in gone:
            self.storage.delete_segment(self.model, name)
        if gone:
            log.info("unused segments deleted", segments=len(gone), kept=len(stored) - len(gone))
        return gone

    def close(self) -> None:
        if self.releases is not None:
            self.releases.close()


def storage_of(settings: Settings) -> Storage:
    """The configured storage: a file system path, or an S3 bucket with the [storage] options."""
    from patching.storage_uri import open_storage

    assert settings.storage.root is not None  # resolved by load_settings
    return open_storage(settings.storage.root, settings.storage.s3_options())


def signer_of(settings: Settings) -> Signer | None:
    """The publisher's signing key ([publish] signing_key, or the systemd credential signing.key);
    None publishes unsigned versions. SigningError names an unusable key file."""
    if settings.publish.signing_key is None:
        return None
    from patching.signing import load_signer

    return load_signer(settings.publish.signing_key)


def unsigned_after_signed(storage: Storage, model: str, signer: Signer | None) -> str | None:
    """Why publishing without a key would be wrong here (LATEST's version is signed, so services
    that trust its key would refuse everything published next), or None."""
    if signer is not None:
        return None
    try:
        pointer = storage.latest(model)
        if pointer is None:
            return None
        manifest = decode_manifest(storage.read(model, pointer, MANIFEST_FILE), model, pointer)
    except (OSError, CheckpointError):
        return None  # nothing usable to compare with: recovery deals with it
    signature = manifest.get("signature")
    if not isinstance(signature, dict):
        return None
    return (
        f"LATEST (version {pointer}) is signed by key {signature.get('key_id')}, but no signing key is set: "
        "services that trust that key would refuse every new version (set publish.signing_key)"
    )


def daemon_publisher(settings: Settings, store: Store, model: PatchedModel) -> Publisher:
    """The running daemon's publisher: its storage root, release topic, retention and key from settings."""
    return Publisher(
        settings.model.name,
        store,
        storage_of(settings),
        BaseInfo.of_model(model),
        releases=ReleaseSender(settings.kafka),
        keep=settings.publish.keep_versions,
        signer=signer_of(settings),
    )


# ---------------------------------------------------------------------------- contents


def _reusable(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A format-2 manifest's segments by the patches they hold (nothing for format 1)."""
    return {str(e["ids_sha256"]): e for e in manifest.get("segments", []) if "ids_sha256" in e}


def concat_neurons(
    patches: Sequence[PatchRecord], hidden_size: int, metadata: dict[str, str] | None = None
) -> tuple[bytes, list[str]]:
    """patches.safetensors for the stored patches' neurons, in order, and the edit id of every neuron.

    Each stored row holds one patch in the same format (patching/patchfile.py), so its dtype is
    kept: a version of bfloat16 neurons is bfloat16, bit for bit."""
    parts = [patchfile.decode(p.neurons, where=f"patch {p.id}", edit_id=str(p.mistake_id)) for p in patches]
    merged = patchfile.concat(parts, hidden_size)
    blob = patchfile.encode(merged.keys, merged.biases, merged.values, merged.edit_ids, metadata, merged.subject)
    return blob, merged.edit_ids


def gate_figures(patches: Sequence[PatchMeta] | Sequence[PatchRecord]) -> dict[str, Any]:
    """The gate's figures per edit (as stored when it was accepted) and their totals."""
    per_edit = {str(p.mistake_id): {k: p.gate[k] for k in GATE_FIELDS if p.gate.get(k) is not None} for p in patches}
    return {
        "edits": per_edit,
        "changed_total": sum(int(g.get("changed", 0)) for g in per_edit.values()),
        "retention_failed_total": sum(int(g.get("retention_failed", 0)) for g in per_edit.values()),
        "heldout_active_max": max((float(g.get("heldout_active", 0.0)) for g in per_edit.values()), default=0.0),
    }
