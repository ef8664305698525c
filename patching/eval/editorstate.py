"""An evaluate editor's state between the runs of one stream: `<report>.state.safetensors`.

`patchd evaluate --resume` continues a stopped tpatcher stream from its neurons
(`<report>.patches.safetensors`, patching/eval/resume.py). GRACE and WISE hold other state (a
codebook; side memories, shards and random generators), which each editor gives as named tensors
plus a JSON-able dict (`state()` / `load_state()`). This module owns the file: the tensors by name,
the editor's name and the dict in the safetensors header. safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

HEADER_KEY = "patchd_editor_state"  # the header entry holding {"editor": ..., "meta": ...} as JSON


@dataclass
class EditorState:
    """What an editor needs to go on exactly where it stopped."""

    editor: str  # the editor's name (grace, wise): a state is loaded into the same editor only
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]  # JSON-able
    rows: int = 0  # mistakes of the stream gone through when it was taken (the report's rows)


def state_path(report: Path) -> Path:
    """report.json -> report.state.safetensors"""
    return report.with_name(report.stem + ".state.safetensors")


def write_state(path: Path, state: EditorState) -> None:
    """Written beside and renamed over: a kill mid-write leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.tensors.items()}
    save_file(
        tensors,
        str(tmp),
        metadata={HEADER_KEY: json.dumps({"editor": state.editor, "rows": state.rows, "meta": state.meta})},
    )
    os.replace(tmp, path)


def read_state(path: Path) -> EditorState:
    """The state written by `write_state`; anything else raises ValueError saying what is wrong."""
    try:
        with safe_open(str(path), framework="pt") as f:  # one read: the header and the tensors
            header = (f.metadata() or {}).get(HEADER_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a safetensors editor state ({exc})") from exc
    if header is None:
        raise ValueError(f"{path}: no {HEADER_KEY} header: not written by patchd evaluate")
    try:
        head = json.loads(header)
        return EditorState(str(head["editor"]), tensors, dict(head["meta"]), int(head["rows"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: a damaged {HEADER_KEY} header ({exc})") from exc
