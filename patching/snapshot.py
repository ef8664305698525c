"""THE engine snapshot format: a Patcher's whole edit state in one safetensors file.

A restart used to replay every stored patch (a forward pass and the gate each), so its time grew
with the history: minutes at 10,000 patches. A snapshot holds what those replays would rebuild:

    keys [n, d], biases [n], values [n, d]        every neuron of the patched layer
    memory_rows [m, d]                            the rows accepted edits appended to M
    heldout_ffn [H, d], heldout_pred [H]          the held-out cache with every neuron in place
    retention_q / _ffn / _residual [R, d]         the rows of every accepted edit (the gate's
    retention_targets [R], retention_group [R]    retention check), group = edit number
    subject_rows [P, d_s], subject_ids [P],       trainer.subject_key only (format 2): the edits'
    subject_lengths [E], subject_memory_refs       layer-L_s sequences, the (sequence, position) of
    [m, 2], subject_retention_refs [R, 2],         M's edit rows and of the retention rows, and the
    subject_w [n, d_s], subject_a/_c [n]           layer's detectors (absent while none has one)
    metadata  format, edits (JSON list), neuron_edits (JSON list), plus the writer's own keys
              (daemon/model.py: the base identity, the layer, the activation, the input digest
              and a digest of the stored patches it covers)

Restoring it gives the uninterrupted run's state bit for bit (EditState). The file is written to
a temporary name, fsynced and renamed: a crash leaves the previous snapshot or none, never half
of one. A snapshot is a cache: a missing, unreadable or mismatched one is ignored with a reason
and the engine falls back to replaying patches. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from patching.engine import EditState, SubjectState
from patching.trainer import EditTensors

FORMAT = "1"
SUBJECT_FORMAT = "2"  # FORMAT plus the subject tensors: code that reads only "1" refuses it and replays
_RETENTION = ("q", "ffn", "residual", "targets", "group")


class SnapshotUnusable(ValueError):
    """The snapshot cannot be used (unreadable, another format, or written for something else)."""


def save(path: Path, state: EditState, meta: Mapping[str, str]) -> int:
    """Write `state` with the caller's `meta` atomically; returns the file's size in bytes."""
    tensors: dict[str, torch.Tensor] = {
        "keys": state.keys,
        "biases": state.biases,
        "values": state.values,
        "memory_rows": state.memory_rows,
    }
    if state.heldout_ffn is not None and state.heldout_pred is not None:
        tensors["heldout_ffn"], tensors["heldout_pred"] = state.heldout_ffn, state.heldout_pred
    r = state.retention
    if r is not None:
        for name in _RETENTION:
            t = getattr(r, name)
            if t is not None:
                tensors[f"retention_{name}"] = t
    sub = state.subject
    if sub is not None:
        tensors |= {
            "subject_rows": sub.rows,
            "subject_ids": sub.ids,
            "subject_lengths": sub.lengths,
            "subject_memory_refs": sub.memory_refs,
            "subject_retention_refs": sub.retention_refs,
        }
        if sub.detectors is not None:
            tensors |= dict(zip(("subject_w", "subject_a", "subject_c"), sub.detectors, strict=True))
    # clones: safetensors refuses views into a larger buffer (M grows by doubling)
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {
        **meta,
        "format": FORMAT if sub is None else SUBJECT_FORMAT,
        "edits": json.dumps(state.edits),
        "neuron_edits": json.dumps(state.neuron_edits),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(cpu, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path.stat().st_size


def load(path: Path, expect: Mapping[str, str]) -> tuple[EditState, dict[str, str]]:
    """The state stored at `path` and its metadata; SnapshotUnusable when the file is missing,
    unreadable, of another format, or any `expect` key differs (another base, layer, inputs ...)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:  # one read: the metadata and the tensors
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise SnapshotUnusable("no snapshot") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise SnapshotUnusable(f"unreadable: {exc}") from None
    if meta.get("format") not in (FORMAT, SUBJECT_FORMAT):
        raise SnapshotUnusable(f"format {meta.get('format')!r}, this code reads {FORMAT!r} and {SUBJECT_FORMAT!r}")
    for key, value in expect.items():
        if meta.get(key) != value:
            raise SnapshotUnusable(f"written for {key} = {meta.get(key)!r}, not {value!r}")
    try:
        edits, neuron_edits = json.loads(meta["edits"]), json.loads(meta["neuron_edits"])
        retention = None
        if "retention_q" in tensors:
            retention = EditTensors(
                tensors["retention_q"],
                tensors["retention_ffn"],
                tensors["retention_residual"],
                tensors["retention_targets"],
                tensors.get("retention_group"),
            )
        state = EditState(
            [str(e) for e in edits],
            [str(e) for e in neuron_edits],
            tensors["keys"],
            tensors["biases"],
            tensors["values"],
            tensors["memory_rows"],
            tensors.get("heldout_ffn"),
            tensors.get("heldout_pred"),
            retention,
            _subject(tensors) if meta["format"] == SUBJECT_FORMAT else None,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise SnapshotUnusable(f"incomplete: {exc!r}") from None
    if len(state.neuron_edits) != state.keys.shape[0] or set(state.neuron_edits) - set(state.edits):
        raise SnapshotUnusable("its neurons and edits do not match")
    return state, meta


def _subject(tensors: Mapping[str, torch.Tensor]) -> SubjectState:
    """The subject part of a format-2 snapshot (KeyError when a tensor is missing: incomplete)."""
    detectors = None
    if "subject_w" in tensors:
        detectors = (tensors["subject_w"], tensors["subject_a"], tensors["subject_c"])
    return SubjectState(
        tensors["subject_rows"],
        tensors["subject_ids"],
        tensors["subject_lengths"],
        tensors["subject_memory_refs"],
        tensors["subject_retention_refs"],
        detectors,
    )
