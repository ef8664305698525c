"""Continuing an interrupted `patchd evaluate` stream exactly where it stopped.

A zsRE stream is ~1,285 edits, hours on a CPU. A run stopped with Ctrl-C (or `kill`) writes its
partial report and, next to it, the neurons of every accepted edit (`<report>.patches.safetensors`,
safetensors only). `--resume REPORT` loads the base again, re-applies those neurons in their
original order through `Patcher.replay` (which rebuilds the memory, held-out and retention caches
exactly as the edits had left them) and goes on with the next mistake of the same stream: the same
model, so one stream, not a restart.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from patching.engine import Patcher
from patching.trainer import Neurons


class ResumeError(ValueError):
    """The stopped run cannot be continued by this command line (the message says why)."""


# what must match between the stopped run and the resumed one (else it is another stream)
SAME = ("editor", "base", "data", "seed", "train_equivalents", "train_config", "gate_config")


def patches_path(report: Path) -> Path:
    """report.json -> report.patches.safetensors"""
    return report.with_name(report.stem + ".patches.safetensors")


def save_patches(path: Path, patcher: Patcher) -> None:
    """Every neuron of the patched layer with the edit id it belongs to."""
    w = patcher.wrapper
    tensors = {"keys": w.keys.detach().cpu().contiguous(), "biases": w.biases.detach().cpu().contiguous(),
               "values": w.values.detach().cpu().contiguous()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"edit_ids": json.dumps(w.edit_ids)})
    tmp.replace(path)


def load_patches(path: Path) -> dict[str, Neurons]:
    """edit id -> its neurons (keys [m, d], biases [m], values [m, d]), in the saved order."""
    try:
        with safe_open(str(path), framework="pt") as fh:  # one read: metadata and tensors
            meta = fh.metadata() or {}
            t = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error type for a damaged file
        raise ResumeError(f"{path}: not a readable safetensors file ({exc})") from exc
    if "edit_ids" not in meta or not {"keys", "biases", "values"} <= set(t):
        raise ResumeError(f"{path}: not a patchd evaluate patches file (no edit_ids or neurons)")
    ids: list[str] = json.loads(meta["edit_ids"])
    out: dict[str, Neurons] = {}
    for edit_id in dict.fromkeys(ids):
        idx = torch.tensor([j for j, e in enumerate(ids) if e == edit_id], dtype=torch.long)
        out[edit_id] = Neurons(t["keys"][idx], t["biases"][idx], t["values"][idx])
    return out


@dataclass
class Resume:
    """A stopped run: its report and the neurons of its accepted edits."""

    report: dict[str, Any]
    neurons: dict[str, Neurons]

    @classmethod
    def read(cls, report_path: Path) -> Resume:
        try:
            report = json.loads(report_path.read_text())
        except json.JSONDecodeError as exc:
            raise ResumeError(f"cannot resume {report_path}: not a JSON report ({exc})") from exc
        if not isinstance(report, dict) or not isinstance(report.get("rows"), list):
            raise ResumeError(f"cannot resume {report_path}: not a patchd evaluate report (no rows)")
        path = patches_path(report_path)
        if not path.is_file():
            raise ResumeError(f"cannot resume {report_path}: {path.name} is missing (reports written before "
                             "resuming existed, and runs of other editors, have none)")
        return cls(report, load_patches(path))

    def check(self, now: dict[str, Any]) -> None:
        """Refuse a resume whose settings differ from the stopped run's (`now`: the same keys)."""
        for key in SAME:
            if self.report.get(key) != now.get(key):
                raise ResumeError(f"cannot resume: {key} differs from the stopped run "
                                 f"({self.report.get(key)!r} there, {now.get(key)!r} now)")
        if not self.report.get("sequential", True):
            raise ResumeError("cannot resume a single-edit (--single) run")

    def rows(self, stream_inputs: Sequence[str]) -> list[dict[str, Any]]:
        """The stopped run's rows, checked to be the start of this stream."""
        rows: list[dict[str, Any]] = self.report.get("rows", [])
        if len(rows) > len(stream_inputs):
            raise ResumeError(f"cannot resume: the stopped run went through {len(rows)} mistakes, this stream "
                             f"has {len(stream_inputs)} (raise --edits)")
        for j, r in enumerate(rows):
            if r["i"] != j or r["input"] != stream_inputs[j]:
                raise ResumeError(f"cannot resume: mistake {j} of the stopped run is not mistake {j} of this stream")
        return rows
