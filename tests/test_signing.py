"""Signed releases, on every medium: a forged or unsigned version is refused, keys rotate, the
publisher's key comes from a setting or a systemd credential.

The forger here can write to the storage: it rewrites the patches, recomputes every sha256 and the
manifest's own checksum, and moves LATEST. Only the signature stops it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as load_np
from safetensors.numpy import save as save_np

from daemon import cli
from daemon.publisher import Publisher, signer_of
from daemon.settings import load_settings
from memory.store import Store
from patching.checkpoint import MANIFEST_FILE, CheckpointError, encode_manifest, read_verified
from patching.client import CheckpointWatcher, load_latest
from patching.signing import SigningError, generate, load_signer, load_trusted
from patching.storage import Storage, segment_name, version_name
from tests.media import get_raw, put_raw
from tests.publishing import MODEL, add_patches, tiny_info
from tests.tinybase import tiny_base


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Two key pairs, as `patchd keys generate` writes them: "a" (the current) and "b" (the next)."""
    root = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("a", "b"):
        private, public, _ = generate(root / name)
        out[name] = (private, public)
    return out


@pytest.fixture
def store(tmp_path: Path):
    with Store.open(f"sqlite:///{tmp_path / 'patchd.db'}") as s:
        yield s


def _publish(store: Store, storage: Storage, base: Path, private: Path | None, seed: int) -> int:
    signer = load_signer(private) if private is not None else None
    add_patches(store, 2, hidden=64, seed=seed)
    published = Publisher(MODEL, store, storage, tiny_info(base), signer=signer).publish_if_changed()
    assert published is not None
    return published.number


def _forge(storage: Storage, source: int, number: int, keep_signature: bool) -> None:
    """What an attacker with write access does: new patches, every checksum recomputed, LATEST moved."""
    prefix = f"{MODEL}/versions/{version_name(source)}"
    body = json.loads(get_raw(storage, f"{prefix}/{MANIFEST_FILE}"))
    entry = body["segments"][-1]
    raw = get_raw(storage, f"{MODEL}/segments/{segment_name(entry['sha256'])}")
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    tensors = load_np(raw)
    tensors["values"] = (tensors["values"] * -3.0).astype(np.float32)  # the attacker's own behaviour
    forged = save_np(tensors, metadata=header.get("__metadata__"))
    sha = hashlib.sha256(forged).hexdigest()
    put_raw(storage, f"{MODEL}/segments/{segment_name(sha)}", forged)
    body["version"], body["parent"] = number, source
    body["segments"][-1] = {**entry, "sha256": sha, "size": len(forged)}
    if not keep_signature:
        body.pop("signature", None)
    put_raw(storage, f"{MODEL}/versions/{version_name(number)}/{MANIFEST_FILE}", encode_manifest(body))  # own checksum
    storage.set_latest(MODEL, number)


@pytest.mark.parametrize("keep_signature", [True, False], ids=["forged", "unsigned"])
def test_a_forged_or_unsigned_version_is_refused_and_the_previous_signed_one_served(
    base: Path,
    store: Store,
    storage: Storage,
    keys: dict[str, tuple[Path, Path]],
    keep_signature: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    private, public = keys["a"]
    first = _publish(store, storage, base, private, seed=1)
    _forge(storage, first, first + 1, keep_signature)
    # every checksum holds: without signatures the forgery would be served
    assert read_verified(storage, MODEL, first + 1).number == first + 1
    assert load_latest(storage, MODEL, base).version == first + 1

    with pytest.raises(CheckpointError, match="does not verify" if keep_signature else "unsigned"):
        read_verified(storage, MODEL, first + 1, load_trusted([public]))
    storage.forget(MODEL, first + 1)
    with caplog.at_level(logging.WARNING, logger="patching.client"):
        loaded = load_latest(storage, MODEL, base, trusted_keys=[public])
    assert loaded.version == first
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"refused version {first + 1}" in warnings[0], warnings
    assert ("does not verify" if keep_signature else "unsigned") in warnings[0]
    # a watcher trusting the key starts on the signed version and never swaps to the forgery
    watcher = CheckpointWatcher(storage, MODEL, base, interval=0.05, trusted_keys=[public])
    assert watcher.version == first and watcher.check() is False


def test_two_trusted_keys_during_a_rotation(
    base: Path, store: Store, storage: Storage, keys: dict[str, tuple[Path, Path]]
) -> None:
    (old_private, old_public), (new_private, new_public) = keys["a"], keys["b"]
    first = _publish(store, storage, base, old_private, seed=10)
    second = _publish(store, storage, base, new_private, seed=11)  # the publisher moved to the new key
    assert read_verified(storage, MODEL, second, load_trusted([old_public, new_public])).signed_by is not None
    assert load_latest(storage, MODEL, base, trusted_keys=[old_public, new_public]).version == second
    # a service not yet given the new key keeps the last version it can trust
    assert load_latest(storage, MODEL, base, trusted_keys=[old_public]).version == first
    # once every publisher signs with the new key, the old one can go
    assert load_latest(storage, MODEL, base, trusted_keys=[new_public]).version == second


def test_keys_generate_writes_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    assert cli.main(["keys", "generate", "--out", str(out)]) == 0
    private, public = out / "signing.key", out / "signing.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    signer, trusted = load_signer(private), load_trusted([public])
    assert list(trusted.keys) == [signer.key_id]
    before = private.read_bytes()
    assert cli.main(["keys", "generate", "--out", str(out)]) == 1  # never overwritten
    assert private.read_bytes() == before
    with pytest.raises(SigningError, match="not an unencrypted PEM private key"):
        load_signer(public)
    with pytest.raises(SigningError, match="not a PEM public key"):
        load_trusted([private])


def test_the_signing_key_comes_from_the_setting_or_a_systemd_credential(
    tmp_path: Path, keys: dict[str, tuple[Path, Path]]
) -> None:
    private, _ = keys["a"]
    home = {"HOME": str(tmp_path)}
    assert signer_of(load_settings(None, home)) is None  # no key: versions are published unsigned
    by_setting = signer_of(load_settings(None, {**home, "PATCHD_PUBLISH_SIGNING_KEY": str(private)}))
    assert by_setting is not None and by_setting.key_id == load_signer(private).key_id
    credentials = tmp_path / "credentials"  # systemd's LoadCredential=signing.key:/etc/patchd/signing.key
    credentials.mkdir()
    (credentials / "signing.key").write_bytes(private.read_bytes())
    by_credential = signer_of(load_settings(None, {**home, "CREDENTIALS_DIRECTORY": str(credentials)}))
    assert by_credential is not None and by_credential.key_id == by_setting.key_id
    with pytest.raises(SigningError, match="cannot read"):
        signer_of(load_settings(None, {**home, "PATCHD_PUBLISH_SIGNING_KEY": str(tmp_path / "missing.key")}))
    assert os.environ.get("CREDENTIALS_DIRECTORY") is None


def test_nothing_unsigned_is_published_over_a_signed_latest(
    base: Path,
    store: Store,
    tmp_path: Path,
    keys: dict[str, tuple[Path, Path]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from daemon.publisher import unsigned_after_signed
    from patching.storage import FileStorage
    from tests.tinybase import write_config

    private, _ = keys["a"]
    storage = FileStorage(tmp_path / "checkpoints")
    assert unsigned_after_signed(storage, MODEL, None) is None  # nothing published yet
    _publish(store, storage, base, private, seed=20)
    assert unsigned_after_signed(storage, MODEL, load_signer(private)) is None
    refusal = unsigned_after_signed(storage, MODEL, None)
    assert refusal is not None and "publish.signing_key" in refusal

    # a daemon started without the key stops before loading anything, naming the setting
    config = write_config(
        tmp_path / "patchd.toml", base=base, data=tmp_path, bootstrap="127.0.0.1:1", topic="t", state=tmp_path / "s"
    )
    monkeypatch.setenv("PATCHD_STORAGE_ROOT", str(storage.root))
    monkeypatch.setenv("PATCHD_MODEL_NAME", MODEL)
    assert cli.main(["run", "--once", "--config", str(config)]) == 2
    assert "publish.signing_key" in capsys.readouterr().err
    # a LATEST whose manifest is unreadable is recovery's business, not a reason to refuse start-up
    latest = storage.latest(MODEL)
    assert latest is not None
    (storage.root / MODEL / "versions" / version_name(latest) / MANIFEST_FILE).write_bytes(b"{not json")
    assert unsigned_after_signed(storage, MODEL, None) is None
