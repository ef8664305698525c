"""Signed releases: who made a version, not just whether its bytes are intact.

Checksums catch corruption, but anyone who can write to the shared storage can replace the patches
and recompute every checksum. So the publisher signs each manifest with an Ed25519 key, and a
downstream service that names its `trusted_keys` serves only versions signed by one of them.

    signing.key   PKCS#8 PEM, private (mode 0600)        patchd keys generate --out DIR
    signing.pub   SubjectPublicKeyInfo PEM, public       handed to every downstream service

The signature lives inside manifest.json (patching/checkpoint.py), so the manifest stays the one
commit marker of a version:

    "signature": {"alg": "ed25519", "key_id": "<16 hex>", "value": "<base64 of 64 bytes>"}

It signs the canonical JSON of the manifest without its "signature" and "checksum" fields; the
manifest lists every file's sha256, so the signature covers every byte of the version. A key's id
is the first 16 hex digits of the sha256 of its raw 32-byte public key: it names which key signed,
so two trusted keys can be held during a rotation.

Why `cryptography`: it is the maintained binding to OpenSSL's Ed25519 that pip, Sigstore and most
of the Python ecosystem rely on; signing is a solved problem not to be written by hand.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ALGORITHM = "ed25519"
PRIVATE_FILE = "signing.key"
PUBLIC_FILE = "signing.pub"


class SigningError(ValueError):
    """A key that cannot be used (unreadable, not Ed25519), or a signature that does not hold."""


def key_id(public_raw: bytes) -> str:
    """The id of a public key: 16 hex digits of the sha256 of its 32 raw bytes."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


@dataclass(frozen=True)
class Signer:
    """A private key ready to sign manifests."""

    key: Any  # cryptography's Ed25519PrivateKey
    key_id: str
    path: str

    def sign(self, message: bytes) -> dict[str, str]:
        value = base64.b64encode(self.key.sign(message)).decode("ascii")
        return {"alg": ALGORITHM, "key_id": self.key_id, "value": value}


@dataclass(frozen=True)
class TrustedKeys:
    """Public keys by id; a version must be signed by one of them."""

    keys: Mapping[str, Any]  # key id -> Ed25519PublicKey
    paths: tuple[str, ...]

    def verify(self, message: bytes, signature: Any) -> str:
        """The id of the trusted key that signed `message`; SigningError naming why not."""
        from cryptography.exceptions import InvalidSignature

        if not isinstance(signature, dict) or not signature:
            raise SigningError("unsigned: no signature in manifest.json")
        if signature.get("alg") != ALGORITHM:
            raise SigningError(f"signed with {signature.get('alg')!r}, not {ALGORITHM}")
        kid = str(signature.get("key_id"))
        key = self.keys.get(kid)
        if key is None:
            raise SigningError(f"signed by unknown key {kid} (trusted: {', '.join(sorted(self.keys)) or 'none'})")
        try:
            key.verify(base64.b64decode(str(signature.get("value")), validate=True), message)
        except (InvalidSignature, ValueError):
            raise SigningError(f"signature by key {kid} does not verify: the manifest was changed") from None
        return kid


def generate(directory: Path) -> tuple[Path, Path, str]:
    """Write a new key pair into `directory` (created 0700); refuses to replace an existing key.
    Returns (private path, public path, key id)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_path, public_path = directory / PRIVATE_FILE, directory / PUBLIC_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise SigningError(f"{path} exists: a key is never overwritten (move it away first)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key()
    public_pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    # O_EXCL + mode 0600 at creation: the private key is never readable by others, not even briefly
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path, key_id(_raw(public))


def load_signer(path: str | Path) -> Signer:
    """The private key in `path` (PEM, unencrypted Ed25519); SigningError naming the problem."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SigningError(f"{path}: cannot read the signing key: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path}: a {type(key).__name__}, not an Ed25519 key")
    return Signer(key, key_id(_raw(key.public_key())), str(path))


def load_trusted(paths: Iterable[str | Path]) -> TrustedKeys:
    """Public keys (PEM files, e.g. signing.pub); SigningError for one that is not an Ed25519 key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    keys: dict[str, Any] = {}
    names = tuple(str(p) for p in paths)
    for name in names:
        try:
            key = serialization.load_pem_public_key(Path(name).read_bytes())
        except OSError as exc:
            raise SigningError(f"{name}: cannot read the trusted key: {exc.strerror or exc}") from None
        except (ValueError, TypeError) as exc:
            raise SigningError(f"{name}: not a PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SigningError(f"{name}: a {type(key).__name__}, not an Ed25519 key")
        keys[key_id(_raw(key))] = key
    if not keys:
        raise SigningError("trusted_keys is empty: no version could ever be served")
    return TrustedKeys(keys, names)


def _raw(public: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
