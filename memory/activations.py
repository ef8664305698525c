"""The activation memory set M and the held-out locality set, as tensors on disk.

Both are FFN inputs (and whatever else the gate caches) captured from ONE base model at ONE
layer; used with another base they would be silently wrong. So everything is keyed by
`ActivationKey` (base name + sha256 of its weights, model_type, layer):

    <root>/<base name>-<sha256[:16]>/<model_type>/layer<L>/
        index.json                    key, and per split the shards in order (rows, edit id, sha256)
        memory-000001.safetensors     tensors with a common first dimension (rows), e.g. q [n, d]
        heldout-000001.safetensors

The key is checked three times: by the directory name, by the index (the full sha256) and by
each shard's safetensors metadata, so a copied or renamed directory is refused as well.

A shard is written to a temporary file, fsynced and renamed, and only then listed in the index
(itself replaced the same way). A crash leaves at most an unlisted shard, which `open` deletes:
readers never see half a shard. One process writes (the worker); readers may be many.
Tensors are safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

SPLITS = ("memory", "heldout")  # M (kept silent by the memory loss) and the held-out locality set
# trainer.subject_key: the layer-L_s rows of M's and the held-out set's input sequences (g, token
# ids), their lengths, and the (sequence, position) of every row of M / of the held-out set
SUBJECT_SPLITS = tuple(f"subject_{s}_{part}" for s in SPLITS for part in ("rows", "lengths", "refs"))
ALL_SPLITS = SPLITS + SUBJECT_SPLITS
INDEX = "index.json"
FORMAT = 1  # bump when the index layout changes; older indexes are refused, not guessed at


class ActivationKeyMismatch(ValueError):
    """Stored activations belong to another base model, model_type or layer."""


@dataclass(frozen=True)
class ActivationKey:
    base_name: str
    base_sha256: str  # of the base weights, as recorded in patch_config.json (DESIGN §5)
    model_type: str
    layer: int

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{64}", self.base_sha256):
            raise ValueError(f"base_sha256 must be 64 lowercase hex digits, got {self.base_sha256!r}")

    def relative_dir(self) -> Path:
        safe_name = re.sub(r"[^A-Za-z0-9._-]+", "_", self.base_name).strip("._") or "base"
        return Path(f"{safe_name}-{self.base_sha256[:16]}") / self.model_type / f"layer{self.layer}"

    def metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


class ActivationStore:
    """The stored activation sets of one key. Use `ActivationStore.open(root, key)`."""

    def __init__(self, directory: Path, key: ActivationKey, index: dict[str, Any]) -> None:
        self.directory = directory
        self.key = key
        self._index = index

    @classmethod
    def open(cls, root: str | os.PathLike[str], key: ActivationKey) -> ActivationStore:
        """Open (or create) the sets for `key`; raises ActivationKeyMismatch for another key's files."""
        directory = Path(root).expanduser() / key.relative_dir()
        directory.mkdir(parents=True, exist_ok=True)
        index_path = directory / INDEX
        if index_path.exists():
            index = json.loads(index_path.read_text())
            if index.get("format") != FORMAT:
                raise ValueError(f"{index_path}: index format {index.get('format')!r}, this patchd reads {FORMAT}")
            if index.get("key") != asdict(key):
                raise ActivationKeyMismatch(
                    f"{directory} holds activations of {index.get('key')}, not of {asdict(key)}"
                )
        else:
            index = {"format": FORMAT, "key": asdict(key), "splits": {split: [] for split in ALL_SPLITS}}
            _write_atomic(index_path, json.dumps(index, indent=1).encode())
        store = cls(directory, key, index)
        store._remove_unlisted()
        return store

    def append(self, split: str, tensors: Mapping[str, torch.Tensor], edit_id: int | None = None) -> int:
        """Add rows to `split`; all tensors share dim 0 (rows). Returns the split's row count after.

        `edit_id` tags rows that came from one accepted edit (the memory update of DESIGN §3), so
        they can be dropped if that edit is revoked.
        """
        shards = self._shards(split)
        rows = self._check(split, tensors)
        number = max((int(s["file"].rsplit("-", 1)[1].split(".")[0]) for s in shards), default=0) + 1
        name = f"{split}-{number:06d}.safetensors"
        metadata = {**self.key.metadata(), "split": split}
        if edit_id is not None:
            metadata["edit_id"] = str(edit_id)
        tmp = self.directory / f".{name}.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        _fsync_and_rename(tmp, self.directory / name)
        digest = _sha256(self.directory / name)
        shards.append({"file": name, "rows": rows, "edit_id": edit_id, "sha256": digest, "tensors": _layout(tensors)})
        self._save_index()
        return self.rows(split)

    def load(self, split: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """All rows of `split`, concatenated in append order: {name: [rows, ...]}; {} when empty."""
        parts: dict[str, list[torch.Tensor]] = {}
        for shard in self._shards(split):
            path = self.directory / shard["file"]
            if _sha256(path) != shard["sha256"]:
                raise ValueError(f"{path}: checksum differs from the index (corrupted or replaced file)")
            self._check_shard_metadata(path)
            for name, tensor in load_file(str(path), device=str(device)).items():
                parts.setdefault(name, []).append(tensor)
        return {name: torch.cat(chunks) for name, chunks in parts.items()}

    def rows(self, split: str) -> int:
        return sum(int(s["rows"]) for s in self._shards(split))

    def edit_ids(self, split: str = "memory") -> list[int]:
        """Edit ids whose rows are in `split`, in append order (restart: find missing memory updates)."""
        return [s["edit_id"] for s in self._shards(split) if s["edit_id"] is not None]

    def drop_edit(self, split: str, edit_id: int) -> int:
        """Remove the rows an edit added to `split` (its patch was revoked); returns rows removed."""
        shards = self._shards(split)
        gone = [s for s in shards if s["edit_id"] == edit_id]
        if not gone:
            return 0
        shards[:] = [s for s in shards if s["edit_id"] != edit_id]
        self._save_index()  # unlist first: a crash now leaves only unlisted files, removed at open
        for shard in gone:
            (self.directory / shard["file"]).unlink(missing_ok=True)
        return sum(int(s["rows"]) for s in gone)

    # -- helpers ------------------------------------------------------------------------------

    def _shards(self, split: str) -> list[dict[str, Any]]:
        if split not in ALL_SPLITS:
            raise ValueError(f"unknown activation split {split!r}; expected one of {ALL_SPLITS}")
        # an index written before the subject splits existed simply has none of them yet
        shards: list[dict[str, Any]] = self._index["splits"].setdefault(split, [])
        return shards

    def _check(self, split: str, tensors: Mapping[str, torch.Tensor]) -> int:
        """Rows of a new shard; its names, trailing shapes and dtypes must match earlier shards."""
        if not tensors:
            raise ValueError("append needs at least one tensor")
        rows = {name: int(t.shape[0]) if t.dim() else -1 for name, t in tensors.items()}
        if len(set(rows.values())) != 1 or -1 in rows.values():
            raise ValueError(f"every tensor needs the same first dimension (rows); got {rows}")
        shards = self._shards(split)
        if shards:
            expected = shards[0]["tensors"]
            got = _layout(tensors)
            if got != expected:
                raise ValueError(f"{split}: tensors {got} do not match the stored {expected}")
        return next(iter(rows.values()))

    def _check_shard_metadata(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        stored = {k: meta.get(k) for k in self.key.metadata()}
        if stored != self.key.metadata():
            raise ActivationKeyMismatch(f"{path} was captured from {stored}, not {self.key.metadata()}")

    def _save_index(self) -> None:
        _write_atomic(self.directory / INDEX, json.dumps(self._index, indent=1).encode())

    def _remove_unlisted(self) -> None:
        listed = {s["file"] for split in ALL_SPLITS for s in self._shards(split)}
        for path in self.directory.iterdir():
            if path.name != INDEX and path.name not in listed and path.name.endswith((".safetensors", ".tmp")):
                path.unlink(missing_ok=True)


def _layout(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Per tensor name: the shape after the row dimension and the dtype (must stay the same)."""
    return {name: {"shape": list(t.shape[1:]), "dtype": str(t.dtype)} for name, t in tensors.items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    _fsync_and_rename(tmp, path)


def _fsync_and_rename(tmp: Path, final: Path) -> None:
    with tmp.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a crash
    finally:
        os.close(dir_fd)
