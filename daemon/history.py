"""Operator actions on published versions: list, roll back, revoke one edit, export a standalone model.

    version_rows(settings)                 -> what `patchd versions` prints
    rollback(settings, number)             -> a NEW version equal to `number`; later patches marked removed
    revoke(settings, edit_id, force=False) -> a NEW version without that edit's neurons
    export(settings, number, out)          -> base + patches in one directory, loadable by load_patched(out, out)

History stays append-only: rollback and revoke never touch an existing version or LATEST's
meaning, they publish a new version, and the store keeps the removed patches (removed_at,
reason), their mistakes becoming `revoked`. Both take the model's lock (memory/lock.py) for the
whole change: a running daemon holds it and would keep the removed neurons in its in-memory model,
so they refuse until it is stopped; it rebuilds without those patches at its next start.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.logs import get_logger
from daemon.publisher import BaseInfo, Published, Publisher, signer_of, storage_of, unsigned_after_signed
from daemon.releases import ReleaseSender
from daemon.settings import Settings
from memory.store import Store
from patching.checkpoint import MANIFEST_FILE, CheckpointError, VerifiedVersion, decode_manifest, read_verified
from patching.storage import Storage, StorageError

if TYPE_CHECKING:  # torch: only revoke needs the model, `patchd versions` and rollback must not wait for it
    from patching.engine import Patcher

log = get_logger(__name__)


class HistoryError(RuntimeError):
    """An operator action refused; the message says why and what to do."""


@dataclass(frozen=True)
class Revoked:
    edit_id: int
    neurons: int
    broken: list[int]  # other edits that are wrong without the revoked neurons (only with force)
    published: Published | None


@contextmanager
def _exclusive(settings: Settings) -> Iterator[Store]:
    """The model's lock (no daemon may patch meanwhile) and the store."""
    from memory.lock import ModelLock

    lock = ModelLock(settings.database.url, settings.model.name)  # type: ignore[arg-type]
    if not lock.try_acquire():
        raise HistoryError(
            f"a daemon is patching {settings.model.name} ({lock.where} is held): stop it first, because it "
            "would keep the removed neurons in its model; it rebuilds without them when it starts again"
        )
    try:
        with Store.open(settings.database.url) as store:
            yield store
    finally:
        lock.release()


def _publisher(settings: Settings, store: Store, base: BaseInfo) -> Publisher:
    from patching.signing import SigningError

    storage = storage_of(settings)
    try:
        signer = signer_of(settings)  # rollback and revoke sign what they publish, as the daemon does
    except SigningError as exc:
        raise HistoryError(f"publish.signing_key: {exc}") from None
    refusal = unsigned_after_signed(storage, settings.model.name, signer)
    if refusal:
        raise HistoryError(refusal)
    return Publisher(
        settings.model.name,
        store,
        storage,
        base,
        releases=ReleaseSender(settings.kafka),
        keep=settings.publish.keep_versions,
        signer=signer,
    )


def verified(storage: Storage, model: str, number: int) -> VerifiedVersion:
    try:
        return read_verified(storage, model, number)
    except (CheckpointError, OSError) as exc:
        raise HistoryError(f"version {number} of {model} cannot be used: {exc}") from None


# ---------------------------------------------------------------------------- rollback


def rollback(settings: Settings, number: int) -> Published | None:
    """Publish a new version with exactly version `number`'s patches; later patches are marked removed.

    None when the current patch set already is version `number`'s and LATEST holds it.
    """
    model = settings.model.name
    with _exclusive(settings) as store:
        target = verified(storage_of(settings), model, number)
        current = store.accepted_patch_ids(model)
        present = {patch_id for patch_id, _ in current}
        gone = [p for p in target.patch_ids if p not in present]
        if gone:
            raise HistoryError(
                f"version {number} holds patches removed since then ({', '.join(map(str, gone[:10]))}): a "
                "rollback cannot bring a removed neuron back; re-queue those mistakes (patchd replay) instead"
            )
        keep = set(target.patch_ids)
        later = [(p, m) for p, m in current if p not in keep]
        for patch_id, _ in later:
            store.mark_patch_removed(patch_id, f"rollback to version {number}")
        if later:
            log.info("patches removed by rollback", version=number, edits=[m for _, m in later])
        publisher = _publisher(settings, store, BaseInfo.of_config(target.config))
        try:
            return publisher.publish_if_changed(reason="rollback", extra={"rollback_of": number})
        finally:
            publisher.close()


# ---------------------------------------------------------------------------- revoke


def revoke(settings: Settings, edit_id: int, force: bool = False) -> Revoked:
    """Remove one edit's neurons, check that every other edit is still right without them (the gate's
    retention check), and publish a new version. Refused when others break, unless `force`."""
    from daemon.model import PatchedModel

    model_name = settings.model.name
    with _exclusive(settings) as store:
        patch = next((p for p in store.patches_of(edit_id) if p.accepted and p.removed_at is None), None)
        if patch is None or patch.model != model_name:
            raise HistoryError(f"edit {edit_id} has no neurons in {model_name} (never patched, or removed already)")
        model = PatchedModel.load(settings)
        model.rebuild(store)
        broken = retention_without(model.patcher, str(edit_id))
        if broken and not force:
            raise HistoryError(
                f"without edit {edit_id}'s neurons, {len(broken)} other edit(s) would be wrong: "
                f"{', '.join(map(str, broken[:10]))}; nothing changed (--force revokes anyway)"
            )
        store.mark_patch_removed(patch.id, f"revoked by an operator{' (forced)' if broken else ''}")
        publisher = _publisher(settings, store, BaseInfo.of_model(model))
        try:
            published = publisher.publish_if_changed(reason="revoke", extra={"revoked": [edit_id]})
        finally:
            publisher.close()
        return Revoked(edit_id, patch.n_neurons, broken, published)


def retention_without(patcher: Patcher, edit_id: str) -> list[int]:
    """Edits (other than `edit_id`) that would be wrong with `edit_id`'s neurons taken out.

    The gate's retention check run backwards: the retention rows hold every kept edit's FFN output
    with all neurons; adding the revoked neurons with negated values removes exactly their share,
    and gate.predictions_with recomputes the head only where they fire.
    """
    import torch

    from patching import gate as gating
    from patching.trainer import Neurons

    wrapper, retention = patcher.wrapper, patcher.retention
    rows = [i for i, e in enumerate(wrapper.edit_ids) if e == edit_id]
    if not rows or retention is None:
        return []
    idx = torch.tensor(rows, dtype=torch.long, device=wrapper.keys.device)
    negated = Neurons(wrapper.keys[idx], wrapper.biases[idx], -wrapper.values[idx])
    new, _ = gating.predictions_with(
        negated,
        patcher.train_cfg.activation,
        retention.q,
        retention.ffn,
        retention.residual,
        patcher.tail,
        retention.targets,
    )
    order = patcher.edit_ids  # retention group g = the g-th kept edit
    assert retention.group is not None  # Patcher.commit numbers every retention row by its edit
    wrong = (new != retention.targets) & (retention.group != order.index(edit_id))
    return sorted({int(order[int(g)]) for g in torch.unique(retention.group[wrong]).tolist()})


# ---------------------------------------------------------------------------- listing


def version_rows(settings: Settings) -> list[dict[str, Any]]:
    """One row per recorded version, oldest first, with what its manifest says when still on storage."""
    model = settings.model.name
    storage = storage_of(settings)
    try:
        pointer = storage.latest(model)
    except StorageError:
        pointer = None
    on_storage = set(storage.versions(model))
    with Store.open(settings.database.url, upgrade=False) as store:
        records = store.versions(model)
    edits_of = {r.number: list(r.edit_ids) for r in records}
    rows: list[dict[str, Any]] = []
    for r in records:
        row: dict[str, Any] = {
            "version": r.number,
            "parent": r.parent,
            "latest": r.number == pointer,
            "edits": len(r.edit_ids),
            "created": r.created_at.isoformat(),
            "manifest_sha256": r.manifest_sha256,
            "on_storage": r.number in on_storage,
        }
        before = set(edits_of.get(r.parent, [])) if r.parent is not None else set()
        row["added"] = [e for e in r.edit_ids if e not in before]
        row["removed"] = sorted(before - set(r.edit_ids))
        if row["on_storage"]:
            try:
                raw = storage.read(model, r.number, MANIFEST_FILE)
                manifest = decode_manifest(raw, model, r.number)
                row["neurons"] = manifest["neurons"]
                parts = [*manifest.get("files", {}).values(), *manifest.get("segments", [])]
                row["size"] = sum(int(f["size"]) for f in parts) + len(raw)
                row["reason"] = manifest.get("reason")
                row["rollback_of"] = manifest.get("rollback_of")
                # the key id the manifest names (checked by readers that hold trusted keys, not here)
                row["signed_by"] = (manifest.get("signature") or {}).get("key_id")
            except (CheckpointError, OSError) as exc:
                row["error"] = str(exc)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- export


def version_and_base(settings: Settings, number: int | None) -> tuple[int, VerifiedVersion, Path]:
    """Version `number` (None: LATEST's), verified, and the base directory the settings name."""
    from patching.bases.load import base_dir

    model = settings.model.name
    storage = storage_of(settings)
    if number is None:
        number = storage.latest(model)
        if number is None:
            raise HistoryError(f"nothing published for {model} on {storage.uri} yet")
    v = verified(storage, model, number)
    assert settings.model.base is not None  # resolved by load_settings
    base = Path(settings.model.base).expanduser()
    return number, v, base if base.is_dir() else base_dir(settings.model.base)


def export(settings: Settings, number: int | None, out: Path) -> tuple[int, Path]:
    """Write version `number` (None: LATEST's) with its base into `out`: load_patched(out, out) loads it."""
    from patching.loading import base_identity

    model = settings.model.name
    storage = storage_of(settings)
    number, v, base = version_and_base(settings, number)
    if base_identity(base) != v.config.base_identity:
        raise HistoryError(f"version {number} was made for another base than {base} (identity differs)")
    out = out.expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise HistoryError(f"{out} exists and is not empty")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    # the base's own files (weights, config, tokenizer); its identity cache is recomputed where it lands
    shutil.copytree(base, tmp, ignore=shutil.ignore_patterns(".patchd-identity.json", ".*"))
    from patching.client import local_files

    for name, data in local_files(v):
        (tmp / name).write_bytes(data)
    (tmp / MANIFEST_FILE).write_bytes(storage.read(model, number, MANIFEST_FILE))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)  # all or nothing, like a version
    return number, out
