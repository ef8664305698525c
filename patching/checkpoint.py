"""The published version format: manifest.json, and reading a version back with every byte checked.

Format 2 (what the publisher writes). A version is its manifest alone; the neurons live in
segments, immutable patch files (patching/patchfile.py) named by their sha256 and shared by every
version that holds the same patches. The manifest lists them in order:

    {"format": "patchd-checkpoint/2", "model", "version", "parent", "created_at", "code_version",
     "base": {"name", "identity"}, "config": {"model_type", "layer", "activation", "hidden_size"},
     "neurons": n, "patches": p, "added": [...], "removed": [...],   # edit ids relative to the parent
     "reason", "gate": {totals, and the figures of the added edits},
     "segments": [{"sha256", "size", "neurons", "patches", "first_patch", "last_patch", "ids_sha256"}],
     "signature": {...}, "checksum": ...}

Each segment's metadata holds the edit id of every neuron, the patch ids and the gate figures of
its patches. How patches are cut into segments is the publisher's business (daemon/publisher.py):
blocks of 16**k patches, so a publish that adds one patch writes one small segment and a manifest,
and a reader that holds the parent's segments fetches only the new ones. The manifest names every
segment's sha256, so the signature and checksum below cover every byte of the version.

Format 3 is format 2 whose segments hold subject neurons (trainer.subject_key: patch files with
detectors, patching/patchfile.py): "config" also names "subject_layer", and each such segment's
entry says its "subject_layer". A reader that knows only formats 1 and 2 refuses it, where it
would otherwise run the neurons without their subject term.

Format 1 (versions published before segments, still read): a version directory holds
patches.safetensors and patch_config.json and manifest.json, written last:

    {"format": "patchd-checkpoint/1", "model": ..., "version": 42, "parent": 41,
     "created_at": ISO-8601, "code_version": ..., "base": {"name", "identity"},
     "neurons": n, "edits": [mistake ids, in order], "patch_ids": [...],
     "added": [...], "removed": [...],   # edit ids relative to the parent
     "reason": "patched" | "rollback" | "revoke", "gate": {...},
     "files": {"patches.safetensors": {"sha256", "size"}, "patch_config.json": {...}},
     "signature": {"alg": "ed25519", "key_id", "value"},   # when the publisher has a key
     "checksum": sha256 of the manifest without this field}

The manifest is canonical JSON (sorted keys, fixed indent) and carries its own checksum, so a
flipped byte anywhere in it is caught too: the bytes on storage must be exactly the canonical
encoding of what they decode to. The signature (patching/signing.py) covers the canonical JSON
without "signature" and "checksum", and so every file through its sha256: a reader given trusted
keys refuses a version nobody it trusts signed. torch-free: the publisher uses this module without it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from patching.patchfile import (
    CONFIG_FILE,
    PATCHES_FILE,
    PatchConfig,
    PatchStateError,
    header_of,
    parse_config,
)
from patching.storage import Storage, segment_name

if TYPE_CHECKING:
    from patching.signing import Signer, TrustedKeys

MANIFEST_FILE = "manifest.json"
FORMAT_1 = "patchd-checkpoint/1"
FORMAT = "patchd-checkpoint/2"  # what the publisher writes
FORMAT_3 = "patchd-checkpoint/3"  # ... when a segment holds subject neurons
SEGMENTED = (FORMAT, FORMAT_3)
REQUIRED_FILES = (PATCHES_FILE, CONFIG_FILE)  # format 1
CONFIG_FIELDS = ("model_type", "layer", "activation", "hidden_size")  # format 2's "config"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(ValueError):
    """A version that must not be served: incomplete, corrupt, or made for another base."""


class UntrustedVersion(CheckpointError):
    """Intact, but not signed by a trusted key (unsigned, a bad signature, an unknown key)."""


class VersionMissing(CheckpointError):
    """No manifest (or a listed file) where the version should be: deleted, never completed, or not
    visible yet to this reader (an NFS client's directory cache): worth another look later."""


def file_entry(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False).encode() + b"\n"


def signed_bytes(body: dict[str, Any]) -> bytes:
    """What a manifest's signature signs: its canonical JSON without "signature" and "checksum"."""
    return _canonical({k: v for k, v in body.items() if k not in ("checksum", "signature")})


def encode_manifest(body: dict[str, Any], signer: Signer | None = None) -> bytes:
    """Canonical manifest bytes with the self-checksum added (and the signature, given a signer)."""
    plain = {k: v for k, v in body.items() if k != "checksum"}
    if signer is not None:
        plain = {**plain, "signature": signer.sign(signed_bytes(plain))}
    return _canonical({**plain, "checksum": hashlib.sha256(_canonical(plain)).hexdigest()})


def decode_manifest(raw: bytes, model: str | None = None, number: int | None = None) -> dict[str, Any]:
    """Parse and check a manifest; CheckpointError names what is wrong."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{MANIFEST_FILE} is not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("format") not in (*SEGMENTED, FORMAT_1):
        raise CheckpointError(f"{MANIFEST_FILE} is not a {FORMAT} (or {FORMAT_3}, {FORMAT_1}) manifest")
    # equal bytes <=> the stored checksum is right AND nothing outside the parsed values changed
    if encode_manifest(body) != raw:
        raise CheckpointError(f"{MANIFEST_FILE} fails its checksum (changed after it was written)")
    if model is not None and body.get("model") != model:
        raise CheckpointError(f"{MANIFEST_FILE} is for model {body.get('model')!r}, not {model!r}")
    if number is not None and body.get("version") != number:
        raise CheckpointError(f"{MANIFEST_FILE} says version {body.get('version')}, its directory is {number}")
    if body["format"] == FORMAT_1:
        files = body.get("files")
        if not isinstance(files, dict) or any(name not in files for name in REQUIRED_FILES):
            raise CheckpointError(f"{MANIFEST_FILE} does not list {', '.join(REQUIRED_FILES)}")
        return body
    segments, config = body.get("segments"), body.get("config")
    if not isinstance(config, dict) or any(k not in config for k in CONFIG_FIELDS):
        raise CheckpointError(f"{MANIFEST_FILE} has no config with {', '.join(CONFIG_FIELDS)}")
    if not isinstance(segments, list) or not all(_segment_entry(e) for e in segments):
        raise CheckpointError(f"{MANIFEST_FILE} lists its segments wrongly")
    subject = body["format"] == FORMAT_3
    if subject != isinstance(config.get("subject_layer"), int):
        raise CheckpointError(f"{MANIFEST_FILE}: only a {FORMAT_3} manifest, and every one, names config.subject_layer")
    if sum(e["neurons"] for e in segments) != body.get("neurons"):
        raise CheckpointError(f"{MANIFEST_FILE}: its segments do not add up to {body.get('neurons')} neurons")
    return body


def _segment_entry(e: Any) -> bool:
    return (
        isinstance(e, dict)
        and isinstance(e.get("sha256"), str)
        and bool(_SHA256.fullmatch(e["sha256"]))
        and all(isinstance(e.get(k), int) and e[k] >= 0 for k in ("size", "neurons", "patches"))
    )


@dataclass(frozen=True)
class VerifiedVersion:
    """A version whose manifest and files all matched their checksums, held in memory."""

    model: str
    number: int
    manifest: dict[str, Any]
    manifest_sha256: str
    files: dict[str, bytes]  # file name -> bytes, every file the manifest lists (format 1)
    manifest_size: int
    signed_by: str | None = None  # the trusted key's id, when the reader asked for a signature
    segments: dict[str, bytes] = field(default_factory=dict)  # segment name -> bytes, in order (format 2)

    @property
    def segmented(self) -> bool:
        return self.manifest.get("format") in SEGMENTED

    @cached_property
    def _segment_meta(self) -> list[dict[str, str]]:
        return [header_of(data)[1] for data in self.segments.values()]

    @cached_property
    def neuron_edits(self) -> list[str]:
        """The edit id of every neuron, in order."""
        if not self.segmented:
            return list(self.config.edit_ids)
        return [str(e) for meta in self._segment_meta for e in json.loads(meta["edit_ids"])]

    @cached_property
    def config(self) -> PatchConfig:
        if not self.segmented:
            return parse_config(self.files[CONFIG_FILE])
        m, c = self.manifest, self.manifest["config"]
        return PatchConfig(
            base_identity=m["base"]["identity"],
            model_type=c["model_type"],
            layer=c["layer"],
            activation=c["activation"],
            hidden_size=c["hidden_size"],
            n=m["neurons"],
            edit_ids=self.neuron_edits,
            code_version=m.get("code_version", ""),
            base_name=m["base"].get("name"),
            extra={k: m.get(k) for k in ("model", "version", "parent", "created_at")},
        )

    @property
    def edits(self) -> list[int]:
        """Mistake ids of the edits in the version, in acceptance order."""
        if not self.segmented:
            return [int(e) for e in self.manifest.get("edits", [])]
        return [int(e) for e in dict.fromkeys(self.neuron_edits)]

    @cached_property
    def patch_ids(self) -> list[int]:
        if not self.segmented:
            return [int(p) for p in self.manifest.get("patch_ids", [])]
        return [int(p) for meta in self._segment_meta for p in json.loads(meta.get("patch_ids", "[]"))]

    @cached_property
    def provenance(self) -> dict[int, dict[str, Any]]:
        """{edit id: who and what is behind it} from the segments' metadata (memory/provenance.py):
        mistake_id, target, input, reporters, reporter_count, report_count, accepted_at,
        first_version. Empty for format 1 and for segments published before provenance."""
        out: dict[int, dict[str, Any]] = {}
        for meta in self._segment_meta if self.segmented else []:
            for entry in json.loads(meta.get("provenance", "[]")):
                out[int(entry["mistake_id"])] = entry
        return out

    @property
    def size(self) -> int:
        """Bytes of the whole version: its files or segments, and the manifest."""
        return (
            sum(len(b) for b in self.files.values()) + sum(len(b) for b in self.segments.values()) + self.manifest_size
        )


def read_verified(
    storage: Storage,
    model: str,
    number: int,
    trusted: TrustedKeys | None = None,
    held: Mapping[str, bytes] | None = None,
) -> VerifiedVersion:
    """Read version `number` once into memory and check every byte of it.

    CheckpointError: the version is there but must not be used (missing manifest or file, a
    checksum or size mismatch, an unreadable patch_config.json). OSError from the storage
    (a file vanishing while read, an NFS hiccup) propagates: it may pass on a later try.
    A medium that serves files from a local cache (S3) is read once more without it when the
    first read fails its checks: a corrupt cached copy must not condemn a good version.
    With `trusted` keys, a version not signed by one of them is UntrustedVersion.
    `held`: segments the reader already has (name -> bytes, e.g. those of the version it serves);
    only the others are read from storage. Every segment is checked against the manifest either way.
    """
    try:
        return _read_verified(storage, model, number, trusted, held or {})
    except (VersionMissing, UntrustedVersion):
        raise
    except CheckpointError:
        if not storage.forget(model, number):
            raise
        return _read_verified(storage, model, number, trusted, {})


def _read_verified(
    storage: Storage, model: str, number: int, trusted: TrustedKeys | None, held: Mapping[str, bytes]
) -> VerifiedVersion:
    try:
        raw = storage.read(model, number, MANIFEST_FILE)
    except FileNotFoundError:
        raise VersionMissing(f"version {number} has no {MANIFEST_FILE}: it is not a version") from None
    manifest = decode_manifest(raw, model, number)
    signed_by = None
    if trusted is not None:  # before any file is fetched: an untrusted version costs one request
        from patching.signing import SigningError

        try:
            signed_by = trusted.verify(signed_bytes(manifest), manifest.get("signature"))
        except SigningError as exc:
            raise UntrustedVersion(f"version {number}: {exc}") from None
    if manifest["format"] in SEGMENTED:
        segments = _read_segments(storage, model, number, manifest, held)
        v = VerifiedVersion(model, number, manifest, hashlib.sha256(raw).hexdigest(), {}, len(raw), signed_by, segments)
        if len(v.neuron_edits) != manifest["neurons"] or len(v.patch_ids) != manifest.get("patches"):
            raise CheckpointError(f"version {number}: its segments hold other neurons or patches than it lists")
        return v
    files: dict[str, bytes] = {}
    for name, entry in sorted(manifest["files"].items()):
        try:
            data = storage.read(model, number, name)
        except FileNotFoundError:
            raise VersionMissing(f"version {number}: {name} is missing") from None
        if len(data) != entry.get("size") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise CheckpointError(f"version {number}: {name} does not match its checksum in {MANIFEST_FILE}")
        files[name] = data
    try:
        parse_config(files[CONFIG_FILE])
    except PatchStateError as exc:
        raise CheckpointError(f"version {number}: {exc}") from None
    return VerifiedVersion(model, number, manifest, hashlib.sha256(raw).hexdigest(), files, len(raw), signed_by)


def _read_segments(
    storage: Storage, model: str, number: int, manifest: dict[str, Any], held: Mapping[str, bytes]
) -> dict[str, bytes]:
    """Every segment the manifest lists, from `held` or storage, each checked (size, sha256, shapes)."""
    segments: dict[str, bytes] = {}
    for entry in manifest["segments"]:
        name = segment_name(entry["sha256"])
        data = held.get(name)
        if data is None:
            try:
                data = storage.read_segment(model, name)
            except FileNotFoundError:
                raise VersionMissing(f"version {number}: segment {name} is missing") from None
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"version {number}: segment {name} does not match its checksum")
        try:
            shapes, meta = header_of(data)
            ids, patches = json.loads(meta["edit_ids"]), json.loads(meta.get("patch_ids", "[]"))
        except (PatchStateError, KeyError, ValueError) as exc:
            raise CheckpointError(f"version {number}: segment {name} is not a patch file: {exc}") from None
        n = entry["neurons"]
        if shapes.get("keys", [None])[0] != n or len(ids) != n or len(patches) != entry["patches"]:
            raise CheckpointError(f"version {number}: segment {name} holds other neurons than listed")
        segments[name] = data
    return segments
