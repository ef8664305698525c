"""THE patch file format: one writer, one reader, for every place patch neurons are stored.

A patch file is safetensors with three tensors and the edit id of every neuron in its metadata:

    keys    [n, d]   the neurons' key vectors (rows of the patched FFN's first projection)
    biases  [n]      their biases
    values  [n, d]   their value vectors (added to the FFN's output, scaled by the activation)
    metadata         {"edit_ids": JSON list of n strings, plus whatever the writer adds}

Subject neurons (trainer.subject_key, patching/subject.py) add three tensors, written only when a
neuron has a detector, so a file without one is byte for byte what it was before:

    subject_w [n, d_s]  each neuron's detector over layer L_s's FFN input (zeros: an ordinary neuron)
    subject_a [n]       the detector's bias
    subject_c [n]       the gain c of the subject term c * m in the neuron's pre-activation
    metadata            "subject_layer" (L_s) and "subject_scale" (the width of m's column in
                        training: a replay recovers the trained key's entry as c / scale)

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

    from patching.layer import PatchedFFN

CODE_VERSION = "0.1.0"
PATCHES_FILE = "patches.safetensors"
CONFIG_FILE = "patch_config.json"
TENSORS = ("keys", "biases", "values")
SUBJECT_TENSORS = ("subject_w", "subject_a", "subject_c")


class PatchStateError(ValueError):
    """A patch file or set that cannot be used (unreadable, inconsistent, or for another base)."""


@dataclass(frozen=True)
class SubjectTensors:
    """The detectors of a patch set's neurons: w [n, d_s], a [n], c [n] (zeros for an ordinary
    neuron), the layer L_s they read and the column scale they were trained with."""

    w: torch.Tensor
    a: torch.Tensor
    c: torch.Tensor
    layer: int
    scale: float | None  # None: written outside training (a downstream reader needs only c)

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(w, a, c) of the neurons at `index`; None when none of them has a detector."""
        w = self.w[index]
        if not bool((w != 0).any()):
            return None
        return w, self.a[index], self.c[index]


@dataclass(frozen=True)
class PatchTensors:
    """Neurons and the edit each belongs to: keys [n, d], biases [n], values [n, d], edit_ids n."""

    keys: torch.Tensor
    biases: torch.Tensor
    values: torch.Tensor
    edit_ids: list[str]
    metadata: dict[str, str] = field(default_factory=dict)  # other metadata the writer added
    subject: SubjectTensors | None = None  # subject neurons' detectors, when any neuron has one

    @property
    def n(self) -> int:
        return int(self.keys.shape[0])

    def _index(self, edit_id: str) -> torch.Tensor:
        import torch

        return torch.tensor([j for j, e in enumerate(self.edit_ids) if e == edit_id], dtype=torch.long)

    def of_edit(self, edit_id: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, biases, values) of one edit's neurons, in their saved order."""
        idx = self._index(edit_id)
        return self.keys[idx], self.biases[idx], self.values[idx]

    def subject_of_edit(self, edit_id: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(w, a, c) of one edit's neurons; None when they are ordinary neurons."""
        return None if self.subject is None else self.subject.rows(self._index(edit_id))

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
    subject: SubjectTensors | None = None,
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

    parts = {"keys": keys, "biases": biases, "values": values}
    meta = {**(metadata or {}), "edit_ids": json.dumps([str(e) for e in edit_ids])}
    if subject is not None:
        _check_detectors(subject.w, subject.a, subject.c, n, "detectors")
        parts |= {"subject_w": subject.w, "subject_a": subject.a, "subject_c": subject.c}
        meta["subject_layer"] = str(subject.layer)
        if subject.scale is not None:
            meta["subject_scale"] = repr(float(subject.scale))
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in parts.items()}
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
    if set(tensors) not in (set(TENSORS), set(TENSORS + SUBJECT_TENSORS)):
        raise PatchStateError(
            f"{where}: expected tensors keys, biases, values (and subject_w, subject_a, subject_c), "
            f"got {sorted(tensors)}"
        )
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
    subject = _subject(tensors, with_meta, n, where) if "subject_w" in tensors else None
    return PatchTensors(keys, biases, values, ids, with_meta, subject)


def _subject(tensors: dict[str, torch.Tensor], meta: dict[str, str], n: int, where: str) -> SubjectTensors:
    """The detectors of a decoded file, checked for shape; their metadata leaves `meta`."""
    w, a, c = (tensors[k] for k in SUBJECT_TENSORS)
    _check_detectors(w, a, c, n, f"{where}: detectors")
    try:
        layer = int(meta.pop("subject_layer"))
        raw_scale = meta.pop("subject_scale", None)
        scale = None if raw_scale is None else float(raw_scale)
    except (KeyError, ValueError) as exc:
        raise PatchStateError(f"{where}: detectors without a readable subject_layer ({exc!r})") from exc
    return SubjectTensors(w, a, c, layer, scale)


def _check_detectors(w: torch.Tensor, a: torch.Tensor, c: torch.Tensor, n: int, what: str) -> None:
    """PatchStateError unless w [n, d_s], a [n], c [n]: the writer's check and the reader's."""
    if w.ndim != 2 or w.shape[0] != n or a.shape != (n,) or c.shape != (n,):
        raise PatchStateError(
            f"{what}: shapes {tuple(w.shape)}, {tuple(a.shape)}, {tuple(c.shape)} are not "
            f"subject_w [n, d_s], subject_a [n], subject_c [n] for n = {n}"
        )


def of_layer(wrapper: PatchedFFN, scale: float | None = None) -> PatchTensors:
    """Every neuron a patched layer holds, with its detectors when any neuron has one; `scale`:
    the column width the Patcher trained them with (None outside training: a downstream reader
    needs only c)."""
    subject = None
    if wrapper.det is not None and wrapper.subject_layer is not None:
        w, a, c = wrapper.det
        subject = SubjectTensors(w, a, c, wrapper.subject_layer, scale)
    return PatchTensors(wrapper.keys, wrapper.biases, wrapper.values, list(wrapper.edit_ids), subject=subject)


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
        subject=_concat_subjects(parts),
    )


def _concat_subjects(parts: Sequence[PatchTensors]) -> SubjectTensors | None:
    """The parts' detectors one after the other, zeros for a part of ordinary neurons; None when
    no part has any. Every part with detectors must read the same layer with the same scale."""
    import torch

    with_det = [p.subject for p in parts if p.subject is not None]
    if not with_det:
        return None
    first = with_det[0]
    if any((s.layer, s.scale) != (first.layer, first.scale) for s in with_det):
        raise PatchStateError("patches with detectors on other subject layers or scales cannot be joined")
    w, a, c = [], [], []
    for p in parts:
        s = p.subject
        if s is None:
            s = SubjectTensors(
                first.w.new_zeros(p.n, first.w.shape[1]), first.a.new_zeros(p.n), first.c.new_zeros(p.n), 0, None
            )
        w.append(s.w)
        a.append(s.a)
        c.append(s.c)
    return SubjectTensors(torch.cat(w), torch.cat(a), torch.cat(c), first.layer, first.scale)


def write_file(path: Path, patches: PatchTensors) -> None:
    """Write a patch file atomically (temporary file, then rename): a reader never sees half of one."""
    data = encode(patches.keys, patches.biases, patches.values, patches.edit_ids, patches.metadata, patches.subject)
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
