"""THE patch file format: one writer, one reader, for every place patch neurons are stored.

A patch file is safetensors with three tensors and the edit id of every neuron in its metadata:

    keys    [n, d]   the neurons' key vectors (rows of the patched FFN's first projection)
    biases  [n]      their biases
    values  [n, d]   their value vectors (added to the FFN's output, scaled by the activation)
    metadata         {"edit_ids": JSON list of n strings, plus whatever the writer adds}

Used by the store (one patch's neurons per row: daemon/model.py), the publisher (a version's
patches.safetensors: daemon/publisher.py), the downstream client and `patchd export`
(patching/client.py, patching/loading.py), and `patchd evaluate --resume` (patching/eval/resume.py).
A published version also holds patch_config.json (`PatchConfig`): what the neurons were made for.

The tensors keep their dtype: float32, float16 and bfloat16 all round-trip bit for bit (torch's
safetensors binding, not numpy's, which has no bfloat16). Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where tensors are made: patch_config.json readers stay light
    import torch

CODE_VERSION = "0.1.0"
PATCHES_FILE = "patches.safetensors"
CONFIG_FILE = "patch_config.json"
TENSORS = ("keys", "biases", "values")


class PatchStateError(ValueError):
    """A patch file or set that cannot be used (unreadable, inconsistent, or for another base)."""


@dataclass(frozen=True)
class PatchTensors:
    """Neurons and the edit each belongs to: keys [n, d], biases [n], values [n, d], edit_ids n."""

    keys: torch.Tensor
    biases: torch.Tensor
    values: torch.Tensor
    edit_ids: list[str]
    metadata: dict[str, str] = field(default_factory=dict)  # other metadata the writer added

    @property
    def n(self) -> int:
        return int(self.keys.shape[0])

    def of_edit(self, edit_id: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, biases, values) of one edit's neurons, in their saved order."""
        import torch

        idx = torch.tensor([j for j, e in enumerate(self.edit_ids) if e == edit_id], dtype=torch.long)
        return self.keys[idx], self.biases[idx], self.values[idx]

    def by_edit(self) -> list[tuple[str, slice]]:
        """(edit id, its rows) for each run of one edit's neurons, in order (a patched layer adds them so)."""
        runs: list[tuple[str, slice]] = []
        start = 0
        for end in range(1, self.n + 1):
            if end == self.n or self.edit_ids[end] != self.edit_ids[start]:
                runs.append((self.edit_ids[start], slice(start, end)))
                start = end
        return runs


def encode(
    keys: torch.Tensor,
    biases: torch.Tensor,
    values: torch.Tensor,
    edit_ids: Sequence[str],
    metadata: dict[str, str] | None = None,
) -> bytes:
    """The patch file's bytes; the tensors are copied to the CPU as they are (dtype kept)."""
    n = int(keys.shape[0])
    if keys.ndim != 2 or values.shape != keys.shape or biases.shape != (n,):
        raise PatchStateError(
            f"neurons must be keys [n, d], biases [n], values [n, d]; got {tuple(keys.shape)}, "
            f"{tuple(biases.shape)}, {tuple(values.shape)}"
        )
    if len(edit_ids) != n:
        raise PatchStateError(f"{len(edit_ids)} edit ids for {n} neurons")
    from safetensors.torch import save

    tensors = {name: t.detach().to("cpu").contiguous() for name, t in zip(TENSORS, (keys, biases, values), strict=True)}
    meta = {**(metadata or {}), "edit_ids": json.dumps([str(e) for e in edit_ids])}
    return _canonical(bytes(save(tensors, metadata=meta)))


def _canonical(data: bytes) -> bytes:
    """The same tensors and metadata always give the same bytes: safetensors writes its metadata
    in hash-map order, which differs from run to run, so the header is re-written with sorted keys
    (same length, padded with spaces as safetensors pads it). Segments are named by their sha256,
    so equal contents then get equal names (a rollback reuses the segments it points back to)."""
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    if len(header) > size:  # never seen (same JSON, other order); keep what safetensors wrote
        return data
    return data[:8] + header + b" " * (size - len(header)) + data[8 + size :]


def decode(data: bytes, where: str = PATCHES_FILE, edit_id: str | None = None) -> PatchTensors:
    """A patch file's tensors and edit ids, checked for shape; `where` names it in errors.

    `edit_id`: the edit of every neuron when the file does not say (one patch's row stored before
    the store kept edit ids in it); a file that names its edits must agree.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(bytes(data))
        with_meta = _metadata(data)
    except (SafetensorError, ValueError, OSError) as exc:
        raise PatchStateError(f"{where}: not a safetensors file: {exc}") from exc
    if set(tensors) != set(TENSORS):
        raise PatchStateError(f"{where}: expected tensors keys, biases, values, got {sorted(tensors)}")
    keys, biases, values = (tensors[k] for k in TENSORS)
    n = int(keys.shape[0]) if keys.ndim == 2 else -1
    if n < 0 or values.shape != keys.shape or biases.shape != (n,):
        raise PatchStateError(
            f"{where}: tensor shapes {tuple(keys.shape)}, {tuple(biases.shape)}, "
            f"{tuple(values.shape)} are not keys [n, d], biases [n], values [n, d]"
        )
    raw_ids = with_meta.pop("edit_ids", None)
    if raw_ids is None:
        if edit_id is None:
            raise PatchStateError(f"{where}: no edit_ids in its metadata")
        ids = [edit_id] * n
    else:
        try:
            ids = [str(e) for e in json.loads(raw_ids)]
        except (ValueError, TypeError) as exc:
            raise PatchStateError(f"{where}: edit_ids is not a JSON list: {exc}") from exc
        if edit_id is not None and any(e != edit_id for e in ids):
            raise PatchStateError(f"{where}: holds neurons of edits {sorted(set(ids))}, not only of {edit_id}")
    if len(ids) != n:
        raise PatchStateError(f"{where}: {len(ids)} edit ids for {n} neurons")
    return PatchTensors(keys, biases, values, ids, with_meta)


def concat(parts: Sequence[PatchTensors], hidden_size: int, dtype: torch.dtype | None = None) -> PatchTensors:
    """Several patch files' neurons one after the other (a version: every kept patch, in order).

    No parts is an empty patch set of width `hidden_size` in `dtype` (default float32; every patch
    removed: the base itself)."""
    import torch

    if not parts:
        dtype = dtype or torch.float32
        empty = torch.zeros((0, hidden_size), dtype=dtype)
        return PatchTensors(empty, torch.zeros((0,), dtype=dtype), empty.clone(), [])
    return PatchTensors(
        torch.cat([p.keys for p in parts]),
        torch.cat([p.biases for p in parts]),
        torch.cat([p.values for p in parts]),
        [e for p in parts for e in p.edit_ids],
    )


def write_file(path: Path, patches: PatchTensors) -> None:
    """Write a patch file atomically (temporary file, then rename): a reader never sees half of one."""
    data = encode(patches.keys, patches.biases, patches.values, patches.edit_ids, patches.metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def read_file(path: Path) -> PatchTensors:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PatchStateError(f"cannot read {path}: {exc}") from exc
    return decode(data, where=str(path))


def header_of(data: bytes) -> tuple[dict[str, list[int]], dict[str, str]]:
    """A patch file's tensor shapes and metadata from its header alone (no torch, nothing loaded)."""
    try:
        size = int.from_bytes(data[:8], "little")
        if not 0 < size <= len(data) - 8:
            raise ValueError(f"header length {size} does not fit {len(data)} bytes")
        header = json.loads(data[8 : 8 + size])
        shapes = {str(k): [int(x) for x in v["shape"]] for k, v in header.items() if k != "__metadata__"}
        meta = {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise PatchStateError(f"not a safetensors header: {exc}") from exc
    return shapes, meta


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ (the header is 8 bytes of length, then JSON)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


# ---------------------------------------------------------------------------- patch_config.json


@dataclass
class PatchConfig:
    """What a version's neurons were made for: the base (identity = sha256 of its weight files),
    its architecture and width, the patched layer and activation, and the edit of each neuron."""

    base_identity: str
    model_type: str
    layer: int
    activation: str
    hidden_size: int
    n: int
    edit_ids: list[str]
    code_version: str = CODE_VERSION
    base_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def config_bytes(config: PatchConfig) -> bytes:
    """patch_config.json as written to disk (sorted keys: the same config gives the same bytes)."""
    return (json.dumps(asdict(config), indent=2, sort_keys=True) + "\n").encode()


def parse_config(raw: bytes, where: str = CONFIG_FILE) -> PatchConfig:
    try:
        return PatchConfig(**json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise PatchStateError(f"cannot read {where}: {exc}") from exc


def parse_patch_set(raw_config: bytes, raw_patches: bytes, where: str = "") -> tuple[PatchConfig, PatchTensors]:
    """patch_config.json and patches.safetensors bytes -> the config and the neurons, checked to agree."""
    config = parse_config(raw_config, f"{where}/{CONFIG_FILE}" if where else CONFIG_FILE)
    patches = decode(raw_patches, where=f"{where}/{PATCHES_FILE}" if where else PATCHES_FILE)
    if patches.n != config.n or int(patches.keys.shape[1]) != config.hidden_size:
        raise PatchStateError(
            f"{where}: tensor shapes do not match patch_config.json (n={config.n}, d={config.hidden_size})"
        )
    if patches.edit_ids != config.edit_ids:
        raise PatchStateError(f"{where}: the edit ids of {PATCHES_FILE} and {CONFIG_FILE} differ")
    return config, patches
