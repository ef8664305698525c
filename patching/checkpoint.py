"""The published version format: manifest.json, and reading a version back with every byte checked.

A version directory holds patches.safetensors and patch_config.json (the patch set, in the
format of patching/patchfile.py) and manifest.json, written last:

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from patching.patchfile import CONFIG_FILE, PATCHES_FILE, PatchConfig, PatchStateError, parse_config
from patching.storage import Storage

if TYPE_CHECKING:
    from patching.signing import Signer, TrustedKeys

MANIFEST_FILE = "manifest.json"
FORMAT = "patchd-checkpoint/1"
REQUIRED_FILES = (PATCHES_FILE, CONFIG_FILE)


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
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CheckpointError(f"{MANIFEST_FILE} is not a {FORMAT} manifest")
    # equal bytes <=> the stored checksum is right AND nothing outside the parsed values changed
    if encode_manifest(body) != raw:
        raise CheckpointError(f"{MANIFEST_FILE} fails its checksum (changed after it was written)")
    if model is not None and body.get("model") != model:
        raise CheckpointError(f"{MANIFEST_FILE} is for model {body.get('model')!r}, not {model!r}")
    if number is not None and body.get("version") != number:
        raise CheckpointError(f"{MANIFEST_FILE} says version {body.get('version')}, its directory is {number}")
    files = body.get("files")
    if not isinstance(files, dict) or any(name not in files for name in REQUIRED_FILES):
        raise CheckpointError(f"{MANIFEST_FILE} does not list {', '.join(REQUIRED_FILES)}")
    return body


@dataclass(frozen=True)
class VerifiedVersion:
    """A version whose manifest and files all matched their checksums, held in memory."""

    model: str
    number: int
    manifest: dict[str, Any]
    manifest_sha256: str
    files: dict[str, bytes]  # file name -> bytes, every file the manifest lists
    manifest_size: int
    signed_by: str | None = None  # the trusted key's id, when the reader asked for a signature

    @property
    def config(self) -> PatchConfig:
        return parse_config(self.files[CONFIG_FILE])

    @property
    def edits(self) -> list[int]:
        return [int(e) for e in self.manifest.get("edits", [])]

    @property
    def patch_ids(self) -> list[int]:
        return [int(p) for p in self.manifest.get("patch_ids", [])]

    @property
    def size(self) -> int:
        """Bytes on storage: the files and the manifest."""
        return sum(len(b) for b in self.files.values()) + self.manifest_size


def read_verified(storage: Storage, model: str, number: int, trusted: TrustedKeys | None = None) -> VerifiedVersion:
    """Read version `number` once into memory and check every byte of it.

    CheckpointError: the version is there but must not be used (missing manifest or file, a
    checksum or size mismatch, an unreadable patch_config.json). OSError from the storage
    (a file vanishing while read, an NFS hiccup) propagates: it may pass on a later try.
    A medium that serves files from a local cache (S3) is read once more without it when the
    first read fails its checks: a corrupt cached copy must not condemn a good version.
    With `trusted` keys, a version not signed by one of them is UntrustedVersion.
    """
    try:
        return _read_verified(storage, model, number, trusted)
    except (VersionMissing, UntrustedVersion):
        raise
    except CheckpointError:
        if not storage.forget(model, number):
            raise
        return _read_verified(storage, model, number, trusted)


def _read_verified(storage: Storage, model: str, number: int, trusted: TrustedKeys | None) -> VerifiedVersion:
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
